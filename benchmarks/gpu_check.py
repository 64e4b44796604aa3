"""The GPU check behind ``benchmarks/gpu_check.sh``: one NVIDIA H100/H200, offline, under 8 minutes.

1. Engine speed: ResNet-50 at 224 px, AMP (float16) + channels-last, batch 256, on an ImageFolder of
   ``imagenet_sample``'s 1,000 images center-cropped to 224 px and linked ``--copies`` times (real JPEG decoding in
   ``--workers`` loader processes): images/s of the trainer with ``--dap-select none``, the trainer with DaP, and
   a bare PyTorch loop over the same loader (``common.bare_loop``); plus the model alone on a synthetic batch that
   lives on the GPU (no loader), which says whether the loader is the bottleneck.
2. The CIFAR-10 Table 2(f) rows (and Table 4) at GPU speed, one seed, with ``cifar_ablation.sweep`` run
   concurrently (``--jobs``), on a longer schedule than the CPU sweep: E'=20 (the paper's schedule scaled by 1/15,
   p solved for the paper's 63% compute). E'=30 did not fit: on an H200 with 7 runs sharing 16 cores the all-data
   run reached epoch 26 of 30 when the budget ran out (the loader, not the GPU, is the limit at 32 px).

Every step gets what is left of ``--budget-s`` and is killed past it; the summary table is printed last and
written with all figures to ``$OUT/gpu_check.json`` (``./gpu_results`` when OUT is unset). ``--dry-run`` runs
the same code on the CPU at toy size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cifar_ablation  # noqa: E402
from common import (  # noqa: E402
    CIFAR_CANDIDATES,
    CIFAR_TARBALLS,
    IMAGENET_CANDIDATES,
    BenchmarkError,
    cifar_folder,
    find_dir,
    imagenet_folder,
    machine_info,
    mean_std,
    sgd_step,
    trainer_vs_bare,
)


def model_only_img_per_s(*, model: str, img_size: int, batch_size: int, steps: int, device: str, amp: bool,
                         channels_last: bool, speed_flags: bool = True) -> float:
    """Training images/s of ``model`` on one random batch kept on the device (no loader): the engine's ceiling.
    ``speed_flags``: with the trainer's (and timm's train.py's) cuDNN autotuning and TF32 matmuls, as since
    7e910e5; ``False`` measures with torch's defaults instead (both off), as every GPU run before it did. The
    process's flags are as they were afterwards."""
    import timm
    import torch

    from dap_pretrain.distributed import cuda_speed_flags

    dev = torch.device(device)
    before = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
    if speed_flags:
        cuda_speed_flags(dev)
    try:
        net = timm.create_model(model, num_classes=1000).to(dev)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt)
        x = torch.randn(batch_size, 3, img_size, img_size, device=dev).contiguous(memory_format=fmt)
        y = torch.randint(0, 1000, (batch_size,), device=dev)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        dtype = (torch.bfloat16 if dev.type == "cpu" else torch.float16) if amp else None
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        warm, t0 = max(1, steps // 4), 0.0
        for i in range(steps + warm):
            if i == warm:
                torch.cuda.synchronize() if dev.type == "cuda" else None
                t0 = time.perf_counter()
            sgd_step(net, opt, scaler, x, y, dev=dev, dtype=dtype)
        torch.cuda.synchronize() if dev.type == "cuda" else None
        return steps * batch_size / (time.perf_counter() - t0)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = before


def _left(deadline: float, margin: float = 5.0) -> float:
    left = deadline - time.monotonic() - margin
    if left <= 0:
        raise BenchmarkError("time budget spent")
    return left


def engine_speed(args, work: Path, results: dict, deadline: float) -> None:
    """Step 1; fills ``results['engine']``."""
    t0 = time.monotonic()
    classes = 10 if args.dry_run else None
    root = imagenet_folder(find_dir(args.imagenet, IMAGENET_CANDIDATES), work, copies=args.copies,
                           size=args.img_size, max_classes=classes)
    n_images = sum(1 for _ in root.glob("train/*/*"))
    print(f"[{time.monotonic() - t0:.0f} s] ImageFolder of {args.img_size} px crops: {root} ({n_images} images)",
          flush=True)
    eng = {"model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "workers": args.workers,
           "epochs": args.engine_epochs, "images_per_epoch": n_images, "amp": "float16",
           "channels_last": True, "loader": "real JPEG decode (imagenet_sample, 224 px crops)"}
    eng["model_only_img_per_s"] = model_only_img_per_s(model=args.model, img_size=args.img_size,
                                                       batch_size=args.batch_size, steps=args.synthetic_steps,
                                                       device=args.device, amp=True, channels_last=True)
    print(f"model only (synthetic batch on {args.device}): {eng['model_only_img_per_s']:.0f} img/s", flush=True)
    eng.update(trainer_vs_bare(model=args.model, data_root=root, img_size=args.img_size, batch_size=args.batch_size,
                               epochs=args.engine_epochs, workers=args.workers, out_dir=work / "engine",
                               device=args.device, amp=True, channels_last=True, timeout=_left(deadline)))
    eng["seconds"] = time.monotonic() - t0
    results["engine"] = eng


def cifar_rows(args, work: Path, results: dict, deadline: float) -> None:
    """Step 2; fills ``results['cifar']``."""
    t0 = time.monotonic()
    data = find_dir(args.data, CIFAR_CANDIDATES, tuple(CIFAR_TARBALLS.values()))
    per = (20, 10) if args.dry_run else (None, None)
    roots = {"cifar10": cifar_folder(data, work, train_per_class=per[0], test_per_class=per[1])}
    if not (args.dry_run or args.no_table4):  # Table 4 (cifar_ablation --dry-run covers the reduced dataset)
        roots["cifar10_500pc"] = cifar_folder(data, work, train_per_class=500, test_per_class=None)
    sched = cifar_ablation.resolve_setting(args.cifar_epochs, args.cifar_target_compute or None)
    base = ["--model", args.cifar_model, "--img-size", "32", "--aug", "cifar", "--train-split", "train",
            "--val-split", "test", "-b", "128", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "5e-4",
            "--opt", "sgd", "-j", str(args.cifar_workers), "--device", args.device, "--log-interval", "1000"]
    base += ["--amp", "--channels-last"] if args.device == "cuda" else []
    runs_dir = work / "cifar_runs" / f"{args.cifar_model}-e{sched['epochs']}-p{sched['keep']:.4f}"
    print(f"CIFAR rows: {args.cifar_model}, schedule {sched}", flush=True)
    budget = _left(deadline)
    error = None
    try:
        cifar_ablation.sweep(roots=roots, sched=sched, seeds=[0], base_flags=base, runs_dir=runs_dir,
                             rows=tuple(args.cifar_rows), jobs=args.jobs, threads=2, deadline=deadline - 5)
    except BenchmarkError as e:
        error = str(e)
    records = cifar_ablation.collect(runs_dir)
    results["cifar"] = {"model": args.cifar_model, "schedule": sched, "seed": 0, "budget_s": budget, "error": error,
                        "seconds": time.monotonic() - t0,
                        "runs": [{k: r.get(k) for k in cifar_ablation.CSV_FIELDS if k != "output"} for r in records],
                        "table": cifar_ablation.table(records), "table4": cifar_ablation.table4(records)}


def summary_lines(results: dict) -> list[str]:
    """The table printed last."""
    info = results["machine"]
    lines = [f"== GPU check summary: {info['gpu'] or info['cpu']}, torch {info['torch']}, timm {info['timm']}, "
             f"{info['date_utc']} UTC, git {info['git']} =="]
    eng = results.get("engine")
    if eng:
        lines += [f"{eng['model']} {eng['img_size']} px, AMP fp16 + channels-last, batch {eng['batch_size']}, "
                  f"{eng['workers']} workers, {eng['images_per_epoch']} images/epoch, "
                  f"median of epochs 2..{eng['epochs']}",
                  "| what | img/s |", "|---|---:|",
                  f"| model only (synthetic batch on the GPU, no loader) | {eng['model_only_img_per_s']:.0f} |",
                  f"| bare PyTorch loop, project loader | {eng['bare_loop']['img_per_s']:.0f} |",
                  f"| trainer --dap-select none | {eng['trainer_none']['img_per_s']:.0f} |",
                  f"| trainer DaP (hard, p=0.9) | {eng['trainer_dap']['img_per_s']:.0f} |",
                  f"trainer none / bare loop = {eng['trainer_none_vs_bare']:.3f}"]
    else:
        lines.append(f"engine speed: not measured ({results.get('engine_error')})")
    cif = results.get("cifar")
    if cif:
        s = cif["schedule"]
        all_top1 = mean_std([r["top1"] for r in cif["runs"] if r["dataset"] == "cifar10" and r["row"] == "all"])[0]
        lines += [f"CIFAR-10 Table 2(f), {cif['model']}, seed 0, {s['epochs']} epochs "
                  f"(W={s['warmup']} I={s['interval']} p={s['keep']} R={s['reuse']}, "
                  f"LR /10 at {s['milestones']}), planned DaP compute "
                  f"{s['planned_compute']:.2%}; top-1 at 100% {all_top1:.2f}; {cif['seconds']:.0f} s",
                  *cif["table"], *cif["table4"]]
        if cif["error"]:
            lines.append(f"CIFAR rows incomplete: {cif['error']}")
    else:
        lines.append(f"CIFAR rows: not run ({results.get('cifar_error')})")
    lines.append(f"total {results['seconds']:.0f} s")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="CIFAR-10 tarball folder (default ../shared/data/cifar10, then "
                   "shared/data/cifar10)")
    p.add_argument("--imagenet", default=None, help="imagenet_sample folder (default ../shared/data/imagenet_sample)")
    p.add_argument("--work-dir", default=None, help="scratch (default: a folder under /tmp)")
    p.add_argument("--budget-s", type=float, default=470, help="whole check, seconds (the lease is 15 min)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--copies", type=int, default=12, help="links of each imagenet_sample crop per epoch")
    p.add_argument("--engine-epochs", type=int, default=3)
    p.add_argument("--synthetic-steps", type=int, default=40)
    p.add_argument("--cifar-model", default="cifar_resnet20")
    p.add_argument("--cifar-epochs", type=int, default=20, help="E' (the CPU sweep uses 15)")
    p.add_argument("--cifar-target-compute", type=float, default=0.63, help="solve p for this DaP compute (0: p=0.9)")
    p.add_argument("--cifar-workers", type=int, default=2, help="loader workers per concurrent CIFAR run")
    p.add_argument("--jobs", type=int, default=7, help="CIFAR runs at once (5 rows + 2 Table 4 runs)")
    p.add_argument("--cifar-rows", nargs="+", choices=cifar_ablation.ROWS, default=list(cifar_ablation.ROWS))
    p.add_argument("--no-table4", action="store_true", help="skip the CIFAR-10 500/class runs")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-cifar", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, same code paths")
    args = p.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.model, args.img_size, args.batch_size, args.workers, args.copies = "test_resnet", 64, 16, 1, 1
        args.engine_epochs, args.synthetic_steps, args.cifar_epochs, args.jobs, args.cifar_workers = 2, 2, 4, 5, 0
        args.cifar_target_compute = 0  # p = 0.9: four epochs cannot reach 63%
        args.cifar_model = "test_resnet"
    out = Path(os.environ.get("OUT") or "gpu_results")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or f"/tmp/dap-gpu-check{'-dry' if args.dry_run else ''}")
    start = time.monotonic()
    deadline = start + args.budget_s
    results = {"machine": machine_info(), "args": vars(args)}
    print(results["machine"], flush=True)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device visible to torch; run on the GPU machine or pass --dry-run", file=sys.stderr)
            return 2
    for name, step, skip in (("engine", engine_speed, args.skip_engine), ("cifar", cifar_rows, args.skip_cifar)):
        if skip:
            results[f"{name}_error"] = "skipped"
            continue
        try:
            step(args, work, results, deadline)
        except BenchmarkError as e:
            results[f"{name}_error"] = str(e)
            print(f"{name}: {e}", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    results["seconds"] = time.monotonic() - start
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n" + "\n".join(summary_lines(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
