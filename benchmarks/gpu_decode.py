"""GPU JPEG pipeline against CPU decoding and timm's train.py, in one GPU job (issue 12 item 3; issue 11's gap).

Data: ``imagenet_sample``'s 1,000 real JPEGs as they are (short side 256, as ImageNet training reads them after the
usual resize), each hard-linked ``--copies`` times into ``train/<wnid>/``, so an epoch is ``1000 * copies`` files.
Every run: ResNet-50, AMP float16, channels-last, batch 256, ``--workers`` loader processes, ``--epochs`` epochs,
no evaluation, the same seed. Measured, in this order, each with its own time limit:

1. ``model_only``: the model on one synthetic batch kept on the GPU (no loader): the ceiling.
2. ``trainer_cpu_decode``: the trainer, ``--dap-select none``, PIL decoding + timm's transform in the workers.
3. ``trainer_gpu_decode``: the same with ``--gpu-decode``.
4. ``timm_train``: timm's own train.py (``--timm-train PATH``; not part of this repository) with the same flags
   (``--amp --channels-last -b 256 -j W --train-interpolation bilinear``), its per-epoch running average img/s.
5. ``dap_cpu_decode`` / ``dap_gpu_decode``: the trainer with DaP (W=1, I=1, p=0.5, no reuse) for 4 epochs: its
   measured compute fraction against its wall-clock fraction (:func:`wall_vs_compute`); the difference is what
   each epoch's fixed start (loader workers, first batch) costs.

The trainer's figure is the median over epochs 2..E of summary.csv's ``img_per_s`` (samples / seconds of the
epoch's training loop, the first batch's wait included); beside it, the same median with each epoch's wait for its
first batch (``first_batch_s``) left out, what an epoch far longer than this benchmark's would approach. Results
are written to ``$OUT/gpu_decode.json`` after every step and a table is printed last. ``--dry-run`` runs the same
code on the CPU at toy size (no GPU decode).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    IMAGENET_CANDIDATES,
    BenchmarkError,
    _link,
    after_first_batch,
    child_env,
    find_dir,
    machine_info,
    read_summary_csv,
    run_trainer,
    sgd_step,
    steady_img_per_s,
)
from gpu_check import model_only_img_per_s  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN  # noqa: E402  (timm's resnet50 config gives ImageNet's)
from timm.data import IMAGENET_DEFAULT_STD as STD  # noqa: E402


def original_folder(data: Path, work: Path, *, copies: int, max_classes: int | None) -> Path:
    """``work/imagenet_orig_x<copies>/{train,val}/<wnid>/``: the original files, linked; val has one per class."""
    dest = work / (f"imagenet_orig_x{copies}" + ("" if max_classes is None else f"_{max_classes}cls"))
    if (dest / "train").is_dir():
        return dest
    for class_dir in sorted(p for p in data.iterdir() if p.is_dir())[:max_classes]:
        files = sorted(class_dir.iterdir())
        for f in files:
            for k in range(copies):
                dst = dest / "train" / class_dir.name / f"{f.stem}_{k}{f.suffix}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link(f, dst)
        (dest / "val" / class_dir.name).mkdir(parents=True, exist_ok=True)
        _link(files[0], dest / "val" / class_dir.name / files[0].name)
    return dest


def timm_train(script: Path, root: Path, out: Path, *, args, img_size: int, timeout: float) -> dict:
    """timm's train.py on ``root`` with the trainer's flags; returns its last running-average img/s per epoch."""
    cmd = [sys.executable, str(script), "--data-dir", str(root), "--train-split", "train", "--val-split", "val",
           "--model", args.model, "--img-size", str(img_size), "-b", str(args.batch_size),
           "--epochs", str(args.epochs), "-j", str(args.workers),
           "--lr", "0.1", "--sched", "cosine", "--warmup-epochs", "0", "--train-interpolation", "bilinear",
           "--seed", "0", "--output", str(out), "--log-interval", "10", "--pin-mem"]
    cmd += ["--amp", "--channels-last"] if args.device == "cuda" else ["--device", "cpu"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(None), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"timm train.py killed after {timeout:.0f} s") from None
    (out / "timm_train.log").write_text(proc.stdout + proc.stderr)
    # 'Train: 1 [  40/93 ( 44%)]  Loss: ...  Time: 0.067s, 3806.11/s  (0.068s, 3764.02/s)  LR: ...'
    per_epoch: dict[int, float] = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.search(r"Train: (\d+) \[.*\(\s*[\d.]+s,\s*([\d.]+)/s\)", line)
        if m:
            per_epoch[int(m.group(1))] = float(m.group(2))
    if proc.returncode or not per_epoch:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BenchmarkError(f"timm train.py exited {proc.returncode}: {' | '.join(tail)}")
    rates = [per_epoch[e] for e in sorted(per_epoch)]
    return {"img_per_s": statistics.median(rates[1:] or rates), "per_epoch": rates,
            "wall_s": time.perf_counter() - t0}




def _train_split(root: Path, *, args, batches: int):
    """The train split as an IndexedDataset, and a fixed random order of (at most) ``batches`` batches of it."""
    import torch

    from dap_pretrain.data.dataset import IndexedDataset, create_dataset

    ds = IndexedDataset(create_dataset(name="", root=root, split="train", is_training=True))
    n = min(len(ds), batches * args.batch_size)
    return ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()


def _gpu_loader(ds, order: list[int], *, args, img_size: int, **kwargs):
    """:class:`GpuDecodeLoader` over ``order`` with the benchmark's settings; ``kwargs``: its experiments."""
    import torch

    from dap_pretrain.data.gpu_decode import GpuDecodeLoader, dataset_samples

    return GpuDecodeLoader(dataset_samples(ds), sampler=order, batch_size=args.batch_size, img_size=img_size,
                           mean=MEAN, std=STD, device=torch.device(args.device), num_workers=args.workers,
                           channels_last=True, **kwargs)


def _timed(loader, *, device: str, warm: int, step=None) -> float:
    """images/s over ``loader``'s batches after the first ``warm`` (and the one that starts the clock), each batch
    passed to ``step(x, y)`` when given; the GPU is synchronised at both ends."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n, t0 = 0, None
    for k, (x, y, idx) in enumerate(loader):
        if k == warm:
            sync()
            t0 = time.perf_counter()
        elif k > warm:
            n += idx.numel()
        if step is not None:
            step(x, y)
    sync()
    return n / (time.perf_counter() - t0)


def _train_step(args):
    """The benchmark's model (channels-last) and one plain AMP SGD step on it, as the model-only ceiling measures:
    ``(step(x, y), the autocast dtype)``; float16 with a GradScaler on CUDA, bfloat16 on CPU."""
    import timm
    import torch

    from dap_pretrain.distributed import cuda_speed_flags

    dev = torch.device(args.device)
    cuda_speed_flags(dev)  # as the trainer and model_only
    dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    net = timm.create_model(args.model, num_classes=1000).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" else None
    return (lambda x, y: sgd_step(net, opt, scaler, x, y.remainder(1000), dev=dev, dtype=dtype)), dtype


def loader_only(kind: str, root: Path, *, args, img_size: int, batches: int = 30) -> dict:
    """images/s of a loader alone (no model): ``gpu`` (GpuDecodeLoader), ``cpu`` (workers decode with PIL, timm's
    transform) or ``nvjpeg`` (decode_batch alone on bytes already in memory, the same batches)."""
    import torch

    from dap_pretrain.data.gpu_decode import dataset_samples, decode_batch
    from dap_pretrain.data.loader import create_loader, trainer_transform

    dev = torch.device(args.device)
    ds, order = _train_split(root, args=args, batches=batches)
    if kind == "nvjpeg":
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        samples = dataset_samples(ds)
        data = [torch.frombuffer(bytearray(Path(samples[i][0]).read_bytes()), dtype=torch.uint8) for i in order]
        chunks = [data[k : k + args.batch_size] for k in range(0, len(data), args.batch_size)]
        decode_batch(chunks[0], device=dev)
        sync()
        t0 = time.perf_counter()
        for chunk in chunks[1:]:
            decode_batch(chunk, device=dev)
        sync()
        return {"img_per_s": sum(len(c) for c in chunks[1:]) / (time.perf_counter() - t0)}
    if kind == "gpu":
        loader = _gpu_loader(ds, order, args=args, img_size=img_size)
    else:
        ds.transform = trainer_transform(img_size=img_size, aug="imagenet", is_training=True)
        loader = create_loader(ds, batch_size=args.batch_size, sampler=order, mean=MEAN, std=STD, device=dev,
                               num_workers=args.workers, channels_last=True, seed=0)
    res = {"img_per_s": _timed(loader, device=dev.type, warm=2)}
    if kind == "gpu":
        res["producer_host_s"] = {k: round(v, 3) for k, v in loader.stats.items()}  # whole epoch, first batches too
    return res


VARIANTS = {
    "_pinned": {"pin_memory": True},
    "_nested": {"pad": "nested"},
    "_half": {"dtype": "amp"},
    "_fused": {"fuse": True},  # flip, jitter and normalise under torch.compile (finish_crops)
    "_whole": {"chunk": False},  # one worker reads a whole batch (the loader before session 16)
}


def loader_experiments(suffixes: str, *, step: str) -> dict:
    """:class:`GpuDecodeLoader` keywords for ``suffixes``, any of :data:`VARIANTS` in that order (``"_pinned_half"``);
    ``dtype`` is ``"amp"``, the model's autocast dtype."""
    kwargs, rest = {}, suffixes
    for suffix, extra in VARIANTS.items():
        if rest.startswith(suffix):
            kwargs.update(extra)
            rest = rest.removeprefix(suffix)
    if rest:
        raise BenchmarkError(f"unknown step {step!r}: the loader's experiments are the suffixes {', '.join(VARIANTS)}")
    return kwargs


def loader_variant(step: str) -> dict:
    """``model_with_gpu_loader``'s keywords for a step
    ``model_gpu_loader[_same_priority][_pinned][_nested][_half][_fused][_whole]``:
    the bare name runs the steps on a high-priority stream; every other name at the trainer's one priority, with
    the loader experiments its suffixes name (``_half``: batches in the model's AMP dtype)."""
    rest = step.removeprefix("model_gpu_loader")
    if not rest:
        return {"priority": True}
    return {"priority": False, **loader_experiments(rest.removeprefix("_same_priority"), step=step)}


def trainer_probe(step: str, *, profile: dict | None = None) -> list[str] | None:
    """The trainer's entry for a step ``[profile_]trainer_gpu_decode[_pinned][_nested][_half][_fused][_whole]`` or
    ``[profile_]trainer_cpu_decode``: ``None`` (the trainer as committed, ``-m dap_pretrain.train``) unless the step
    names loader experiments (``_half``: float16, the benchmark's AMP dtype) or ``profile`` is given; then
    ``trainer_probe.py`` with them."""
    probe = {} if profile is None else {"profile": profile}
    rest = step.split("_gpu_decode", 1)[1] if "_gpu_decode" in step else ""
    if rest:
        kwargs = loader_experiments(rest, step=step)
        probe["loader"] = {k: "float16" if v == "amp" else v for k, v in kwargs.items()}
    return [str(Path(__file__).with_name("trainer_probe.py")), json.dumps(probe)] if probe else None


def model_with_gpu_loader(
    root: Path, *, args, img_size: int, priority: bool, batches: int = 40, **loader_kwargs
) -> dict:
    """The model-only loop (``sgd_step``) fed by :class:`GpuDecodeLoader` instead of one fixed batch: what the
    pipeline costs the model when both share the GPU. ``priority``: the steps run on a high-priority CUDA stream,
    the pipeline's kernels on its default-priority side stream (tried on an H100 and not kept in the trainer:
    RESULTS section 9); else both at the default priority, as the trainer runs. ``loader_kwargs``: the loader's
    experiments (``pin_memory``, ``pad``, ``dtype="amp"``: the step's autocast dtype, ``fuse``)."""
    import contextlib

    import torch

    dev = torch.device(args.device)
    step, dtype = _train_step(args)
    ds, order = _train_split(root, args=args, batches=batches)
    experiments = {k: dtype if v == "amp" else v for k, v in loader_kwargs.items()}
    loader = _gpu_loader(ds, order, args=args, img_size=img_size, **experiments)
    stream = None
    if priority and dev.type == "cuda":
        stream = torch.cuda.Stream(dev, priority=torch.cuda.Stream.priority_range()[1])
        stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        rate = _timed(loader, device=dev.type, warm=max(1, min(5, len(loader) // 4)), step=step)  # cuDNN, nvjpeg
    shown = {k: v if isinstance(v, bool | str) else str(v) for k, v in experiments.items()}
    if loader.fuse:  # False if torch.compile failed and the batches were finished unfused
        shown["fused"] = loader.fused
    return {"img_per_s": rate, "batches": batches, "priority": priority, **shown}


def profile_gpu_loader(root: Path, *, args, img_size: int, batches: int = 12, top: int = 15) -> dict:
    """Where the GPU pipeline's device time goes: ``torch.profiler`` over ``batches`` batches of
    :class:`GpuDecodeLoader` alone (after 3 warm-up batches); the ``top`` kernels by device time, per batch."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(args.device)
    ds, order = _train_split(root, args=args, batches=batches + 3)
    loader = _gpu_loader(ds, order, args=args, img_size=img_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def prepare(batch) -> None:  # the producer thread's work, run here so that every op lands in the profile
        data, _targets, _indices, seeds, params = batch
        loader.augment(data, params, seeds)

    it = loader.encoded_batches()
    for _ in range(3 if len(loader) > 6 else 1):  # warm-up: nvjpeg's handle, cuDNN, the allocator
        prepare(next(it))
    sync()
    done = 0
    with profile(activities=activities) as prof:
        for batch in it:
            prepare(batch)
            done += 1
        sync()
    per_batch = 1e-3 / max(1, done)  # microseconds -> milliseconds per batch

    def rows(events, key: str) -> list[dict]:
        events = sorted((e for e in events if getattr(e, key, 0) > 0), key=lambda e: getattr(e, key), reverse=True)
        return [{"name": e.key[:90], "ms_per_batch": round(getattr(e, key) * per_batch, 3), "calls": e.count}
                for e in events[:top]]

    averages = prof.key_averages()
    if dev.type != "cuda":
        return {"batches": done, "host_ops": rows(averages, "self_cpu_time_total")}
    from torch.autograd import DeviceType

    dkey = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    # an op's self device time: the kernels it launched itself (nvjpeg's included); kernels: by kernel name
    ops = [e for e in averages if e.device_type == DeviceType.CPU]
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
    return {"batches": done,
            "device_ms_per_batch": round(sum(getattr(e, dkey) for e in ops) * per_batch, 3),
            "ops": rows(ops, dkey), "kernels": rows(kernels, dkey),
            "host_ops": rows(ops, "self_cpu_time_total")}


def timeline(intervals: list[tuple], *, steps: int, wall_ns: float) -> dict:
    """Per-step device figures from ``intervals``, one ``(stream, start_ns, end_ns, is_kernel)`` per kernel or copy.

    ``busy_ms``: the union of all kernels, on any stream (the SMs had work); ``idle_ms``: wall minus busy (the
    SMs waited, e.g. for the host); ``concurrent_ms``: summed kernel time minus busy (two streams' kernels ran at
    once, sharing the SMs); ``kernel_ms``: summed kernel time per stream, largest first; ``copy_ms``: copies and
    memsets, which run on the copy engines.
    """
    kernels = sorted((start, end) for _, start, end, is_kernel in intervals if is_kernel)
    busy, span = 0, None
    for start, end in kernels:
        if span is None or start > span[1]:
            busy += span[1] - span[0] if span else 0
            span = [start, end]
        else:
            span[1] = max(span[1], end)
    busy += span[1] - span[0] if span else 0
    per_stream: dict[str, int] = {}
    for stream, start, end, is_kernel in intervals:
        if is_kernel:
            per_stream[str(stream)] = per_stream.get(str(stream), 0) + end - start
    ms = 1e-6 / max(1, steps)
    total = sum(per_stream.values())
    return {"wall_ms": round(wall_ns * ms, 3), "busy_ms": round(busy * ms, 3),
            "idle_ms": round((wall_ns - busy) * ms, 3), "concurrent_ms": round((total - busy) * ms, 3),
            "kernel_ms": {k: round(v * ms, 3) for k, v in sorted(per_stream.items(), key=lambda kv: -kv[1])},
            "copy_ms": round(sum(e - s for _, s, e, k in intervals if not k) * ms, 3)}


def profiled_timeline(prof, *, steps: int, wall_ns: float) -> dict:
    """:func:`timeline` of a stopped ``torch.profiler.profile``'s CUDA kernels and copies (none on a CPU)."""
    import torch

    cuda = torch.autograd.DeviceType.CUDA
    events = [e for e in prof.profiler.kineto_results.events() if e.device_type() == cuda]
    intervals = [(e.device_resource_id(), e.start_ns(), e.start_ns() + e.duration_ns(),
                  not e.name().startswith(("Memcpy", "Memset"))) for e in events]  # fmt: skip
    return timeline(intervals, steps=steps, wall_ns=wall_ns)


def profile_model_gpu_loader(root: Path, *, args, img_size: int, steps: int = 16, warm: int = 5) -> dict:
    """Where the model loop fed by the pipeline loses time against model-only: ``torch.profiler`` (device
    activity only, to keep its own cost low) over ``steps`` steps of each, after ``warm`` steps, in one process;
    :func:`timeline` figures per step for each. The SMs idle (host-side gaps) or run the pipeline's kernels
    beside or between the model's: the two explanations RESULTS section 9 could not tell apart."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    step, _ = _train_step(args)
    x0 = torch.randn(args.batch_size, 3, img_size, img_size, device=dev).contiguous(memory_format=torch.channels_last)
    y0 = torch.randint(0, 1000, (args.batch_size,), device=dev)

    def measure(batches) -> dict:
        prof, t0 = None, 0
        for k, (x, y) in enumerate(batches):
            if k == warm:
                sync()
                prof = profile(activities=[ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU])
                prof.start()
                t0 = time.perf_counter_ns()
            if k == warm + steps:
                break
            step(x, y)
        if prof is None:
            raise BenchmarkError(f"fewer than {warm + 1} batches to profile; use more --copies")
        sync()
        wall = time.perf_counter_ns() - t0
        prof.stop()
        return profiled_timeline(prof, steps=steps, wall_ns=wall)

    res = {"model_only": measure((x0, y0) for _ in range(warm + steps + 1))}
    ds, order = _train_split(root, args=args, batches=warm + steps + 1)
    loader = _gpu_loader(ds, order, args=args, img_size=img_size)
    res["fed"] = measure((x, y) for x, y, _ in loader)
    res["steps"] = steps
    return res


def wall_vs_compute(output: Path) -> dict:
    """A DaP run's measured compute fraction against its wall-clock fraction: the sum of its epoch times over
    E times the time of its steady full-data epoch (epoch 2; epoch 1 also pays start-up and warm-up)."""
    rows = read_summary_csv(output)
    run = json.loads((output / "run.json").read_text())
    full = rows[1]["epoch_time_s"]
    wall = sum(r["epoch_time_s"] for r in rows) - rows[0]["epoch_time_s"] + full  # epoch 1 counted at steady time
    return {"compute_fraction": run["compute_fraction_measured"], "wall_fraction": wall / (len(rows) * full),
            "epochs": [{k: r[k] for k in ("samples_trained", "epoch_time_s", "img_per_s")} for r in rows]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenet", default=None, help="imagenet_sample folder")
    p.add_argument("--max-classes", type=int, default=None, help="use the first N classes (a smaller carried copy)")
    p.add_argument("--timm-train", default=None, help="timm's train.py (from its repository at the installed version)")
    p.add_argument("--work-dir", default="/tmp/dap-gpu-decode")
    p.add_argument("--model", default="resnet50")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--copies", type=int, default=24)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--window", type=int, default=40,
                   help="timed steps of model_only (a quarter more warm it up) and batches of model_gpu_loader* "
                   "(up to 5 of them warm-up), default 40; run 8's two runs of one 40-batch step differed by 6%%. "
                   "The fed loop has at most the images there are (--copies)")
    p.add_argument("--step-timeout", type=float, default=120)
    p.add_argument("--steps", nargs="+", default=["model_only", "trainer_cpu_decode", "trainer_gpu_decode",
                                                  "timm_train", "dap_cpu_decode", "dap_gpu_decode"],
                   help="also: model_only_torch_defaults (model_only without cuDNN autotuning and TF32, as every "
                   "GPU run before 7e910e5), loader_only_gpu, loader_only_cpu, loader_only_nvjpeg (a loader "
                   "without a model); "
                   "model_gpu_loader (the model-only loop fed by the GPU pipeline, the steps on a high-priority "
                   "stream), model_gpu_loader_same_priority (the same at one priority, as the trainer runs), and that "
                   "with any of the suffixes _pinned, _nested, _half, _fused in this order (the loader's experiments); "
                   "profile_gpu_loader (device time per kernel); profile_model_gpu_loader (SM busy, idle and "
                   "per-stream time per step, model-only beside the loop fed by the pipeline); trainer_gpu_decode "
                   "with the same suffixes (the trainer with those loader experiments, trainer_probe.py); "
                   "profile_trainer_gpu_decode and profile_trainer_cpu_decode (the same figures for 16 of the "
                   "trainer's own steps in its second epoch)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, no GPU decoding")
    args = p.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    img_size, max_classes = 224, args.max_classes
    if args.window < 3:  # the fed loop times the batches after a warm-up one and the one that starts the clock
        p.error(f"--window {args.window}: give at least 3 steps")
    if args.dry_run:
        args.model, args.batch_size, args.workers, args.copies, args.epochs = "test_resnet", 16, 1, 2, 2
        img_size, max_classes = 64, 20
        args.steps = [s for s in args.steps if "gpu_decode" not in s and s != "loader_only_nvjpeg"]
    out = Path(os.environ.get("OUT") or "gpu_results")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir + ("-dry" if args.dry_run else ""))
    root = original_folder(find_dir(args.imagenet, IMAGENET_CANDIDATES), work, copies=args.copies,
                           max_classes=max_classes)
    n = sum(1 for _ in root.glob("train/*/*"))
    results = {"machine": machine_info(), "args": vars(args), "images_per_epoch": n, "steps": {}}
    print(results["machine"], f"{n} images per epoch", flush=True)
    common = ["--model", args.model, "--data-dir", str(root), "--train-split", "train", "--val-split", "",
              "--img-size", str(img_size), "--aug", "imagenet", "-b", str(args.batch_size), "--sched", "cosine",
              "--lr", "0.1", "-j", str(args.workers), "--device", args.device, "--seed", "0", "--channels-last"]
    common += ["--amp", "--amp-dtype", "float16"] if args.device == "cuda" else []
    none = ["--dap-select", "none", "--epochs", str(args.epochs)]
    dap = ["--dap-select", "hard", "--epochs", "4", "--dap-warmup", "1", "--dap-interval", "1", "--dap-keep", "0.5",
           "--dap-reuse"]
    for step in args.steps:
        t0 = time.monotonic()
        try:
            if step in ("model_only", "model_only_torch_defaults"):  # the latter: no cuDNN autotuning nor TF32
                res = {"img_per_s": model_only_img_per_s(model=args.model, img_size=img_size,
                                                         batch_size=args.batch_size, steps=args.window,
                                                         device=args.device,
                                                         amp=True, channels_last=True,
                                                         speed_flags=step == "model_only")}
            elif step.startswith("model_gpu_loader"):
                res = model_with_gpu_loader(root, args=args, img_size=img_size, batches=args.window,
                                            **loader_variant(step))
            elif step == "profile_gpu_loader":
                res = profile_gpu_loader(root, args=args, img_size=img_size)
            elif step == "profile_model_gpu_loader":
                res = profile_model_gpu_loader(root, args=args, img_size=img_size,
                                               **(dict(steps=1, warm=1) if args.dry_run else {}))
            elif step.startswith("loader_only_"):
                res = loader_only(step.removeprefix("loader_only_"), root, args=args, img_size=img_size)
            elif step == "timm_train":
                if not args.timm_train:
                    raise BenchmarkError("no --timm-train given")
                res = timm_train(Path(args.timm_train), root, work / step, args=args, img_size=img_size,
                                 timeout=args.step_timeout)
            elif step.startswith("profile_trainer_"):  # the trainer's own steps, as profile_model_gpu_loader
                out_json = work / step / "profile.json"
                window = dict(warm=1, steps=1) if args.dry_run else dict(warm=5, steps=16)
                flags = common + none + (["--gpu-decode"] if "gpu_decode" in step else [])
                entry = trainer_probe(step, profile={"out": str(out_json), "epoch": 1, **window})
                out_json.unlink(missing_ok=True)
                run_trainer(work / step, flags, rerun=True, timeout=args.step_timeout, entry=entry)
                if not out_json.is_file():
                    raise BenchmarkError(f"the trainer wrote no profile: {out_json}")
                res = {"trainer": json.loads(out_json.read_text())}
            else:
                flags = common + (none if step.startswith("trainer") else dap)
                flags += ["--gpu-decode"] if "gpu_decode" in step else []
                run_trainer(work / step, flags, rerun=True, timeout=args.step_timeout, entry=trainer_probe(step))
                rows = read_summary_csv(work / step)
                res = {"img_per_s": steady_img_per_s(rows), "per_epoch": [r["img_per_s"] for r in rows],
                       "first_batch_s": [r.get("first_batch_s") for r in rows]}
                steady = [{"v": v} for v in map(after_first_batch, rows) if v is not None]
                if len(steady) == len(rows):  # the same median, the epochs' fixed start left out
                    res["after_first_batch_img_per_s"] = steady_img_per_s(steady, key="v")
                if step.startswith("dap"):
                    res.update(wall_vs_compute(work / step))
        except BenchmarkError as e:
            res = {"error": str(e)}
        res["seconds"] = time.monotonic() - t0
        repeat = sum(1 for name in results["steps"] if name.split(" (")[0] == step)
        results["steps"][f"{step} ({repeat + 1})" if repeat else step] = res  # a step run twice keeps both results
        print(f"{step}: {json.dumps(res)}", flush=True)
        (out / "gpu_decode.json").write_text(json.dumps(results, indent=2, default=str))
    info, steps = results["machine"], results["steps"]
    ceiling = steps.get("model_only", {}).get("img_per_s")
    print(f"\n== {info['gpu'] or info['cpu']}, torch {info['torch']}, timm {info['timm']}, {args.model} "
          f"{img_size} px, batch {args.batch_size}, {args.workers} workers, {n} JPEGs/epoch ==")
    print("| what | img/s | of model-only |\n|---|---:|---:|")
    for step, res in steps.items():
        if "img_per_s" in res:
            frac = f"{res['img_per_s'] / ceiling:.3f}" if ceiling else "-"
            extra = ""
            if "compute_fraction" in res:
                extra = (f" (DaP p=0.5, 4 epochs: compute {res['compute_fraction']:.4f}, wall-clock "
                         f"{res['wall_fraction']:.4f})")
            print(f"| {step}{extra} | {res['img_per_s']:.0f} | {frac} |")
            if res.get("after_first_batch_img_per_s"):
                rate = res["after_first_batch_img_per_s"]
                frac = f"{rate / ceiling:.3f}" if ceiling else "-"
                print(f"| {step}, after each epoch's first batch | {rate:.0f} | {frac} |")
        elif "fed" in res or "trainer" in res:  # profile_model_gpu_loader, profile_trainer_*: per step, ms
            for part in ("model_only", "fed", "trainer"):
                if part not in res:
                    continue
                print(f"| {step}, {part}: " + ", ".join(f"{k} {v}" for k, v in res[part].items()) + " | | |")
        else:
            print(f"| {step} | {res.get('error')} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
