"""Does DaP's compute saving show up as wall-clock saving? And what does the trainer cost over a bare loop?

One invocation, same model and data (CIFAR-10 50,000/10,000, built once from ``../shared/data/cifar10``):

1. the full-data run (``--dap-select none``) and the DaP run (``hard``) on the paper's schedule compressed to
   ``--epochs`` (``common.compressed_schedule``; p solved for ``--target-compute``), one after the other; prints
   the compute fraction (run.json, measured), the wall-clock fraction (DaP / full ``wall_time_s``, evaluation and
   checkpoints included) and the training-time fraction (sum over epochs of samples / img_per_s), and the gaps.
2. images/s of the trainer with ``--dap-select none`` vs a bare PyTorch loop (``common.bare_loop``: same model,
   dataset, transform, ``create_loader``, batch size and number of steps), on the first ``--speed-per-class``
   training images per class, median of epochs 2..``--speed-epochs``.

    .venv/bin/python benchmarks/wallclock.py            # about 15 min on 2 idle cores
    .venv/bin/python benchmarks/wallclock.py --dry-run  # toy size, same code paths
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cifar_ablation  # noqa: E402
from common import (  # noqa: E402
    CIFAR_CANDIDATES,
    CIFAR_TARBALLS,
    DEFAULT_WORK_DIR,
    BenchmarkError,
    cifar_folder,
    find_dir,
    machine_info,
    read_summary_csv,
    run_trainer,
    schedule_flags,
    trainer_vs_bare,
)


def train_seconds(output: Path) -> float:
    """Seconds spent in training steps: the sum over epochs of samples_trained / img_per_s (summary.csv)."""
    return sum(r["samples_trained"] / r["img_per_s"] for r in read_summary_csv(output) if r["img_per_s"])


def full_vs_dap(*, root: Path, sched: dict, base: list[str], runs_dir: Path, threads: int | None) -> dict:
    """Runs (or reuses) the full-data and the DaP run; returns their fractions."""
    flags = [*base, *schedule_flags(sched), "--data-dir", str(root), "--seed", "0"]
    full = run_trainer(runs_dir / "full", flags + ["--dap-select", "none"], threads=threads)
    dap = run_trainer(runs_dir / "dap", flags + ["--dap-select", "hard"], threads=threads)
    compute = dap["compute_fraction_measured"] / full["compute_fraction_measured"]
    wall = dap["wall_time_s"] / full["wall_time_s"]
    train = train_seconds(runs_dir / "dap") / train_seconds(runs_dir / "full")
    return {"full": {k: full[k] for k in ("top1", "wall_time_s", "compute_fraction_measured")},
            "dap": {k: dap[k] for k in ("top1", "wall_time_s", "compute_fraction_measured")},
            "compute_fraction": compute, "wallclock_fraction": wall, "train_time_fraction": train,
            "gap_points": 100 * (wall - compute), "train_gap_points": 100 * (train - compute)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder holding the CIFAR-10 tarballs (default ../shared/data/cifar10)")
    p.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR / "wallclock"))
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--epochs", type=int, default=6, help="E' for the full-vs-DaP pair")
    p.add_argument("--target-compute", type=float, default=0.63)
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--speed-per-class", type=int, default=500, help="train images per class for the img/s part")
    p.add_argument("--speed-epochs", type=int, default=3)
    p.add_argument("--dry-run", action="store_true", help="toy size (20 train / 10 test per class, 3 epochs)")
    args = p.parse_args(argv)
    try:
        return _main(args)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    work = Path(args.work_dir).expanduser()
    per = (None, None)
    if args.dry_run:
        work, per, args.epochs, args.speed_per_class, args.speed_epochs = work / "dry-run", (20, 10), 3, 10, 2
    info = machine_info()
    data = find_dir(args.data, CIFAR_CANDIDATES, tuple(CIFAR_TARBALLS.values()))
    root = cifar_folder(data, work, train_per_class=per[0], test_per_class=per[1])
    sched = cifar_ablation.resolve_setting(args.epochs, None if args.dry_run else args.target_compute)
    tag = f"{args.model}-e{args.epochs}-p{sched['keep']:.4f}-b{args.batch_size}"
    print(f"{info}\nschedule {sched}", flush=True)
    base = ["--model", args.model, "--img-size", "32", "--aug", "cifar", "--train-split", "train", "--val-split",
            "test", "-b", str(args.batch_size), "--lr", "0.1", "--weight-decay", "5e-4", "-j", str(args.workers)]
    pair = full_vs_dap(root=root, sched=sched, base=base, runs_dir=work / "runs" / tag, threads=args.threads)
    speed_root = cifar_folder(data, work, train_per_class=args.speed_per_class, test_per_class=per[1])
    speed = trainer_vs_bare(model=args.model, data_root=speed_root, img_size=32, batch_size=args.batch_size,
                            epochs=args.speed_epochs, workers=args.workers, out_dir=work / "speed" / tag,
                            threads=args.threads)
    result = {"machine": info, "args": vars(args), "schedule": sched, "pair": pair, "speed": speed}
    (work / f"wallclock-{tag}.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\n{args.model}, CIFAR-10 {'toy' if args.dry_run else '50,000/10,000'}, {args.epochs} epochs, "
          f"{info['cpu']} x{info['cores']}, torch {info['torch']}, timm {info['timm']}, {info['date_utc']} UTC")
    print("| run | top-1 | compute | wall-clock (s) |\n|---|---:|---:|---:|")
    for name in ("full", "dap"):
        r = pair[name]
        print(f"| {name} | {r['top1']:.2f} | {r['compute_fraction_measured']:.1%} | {r['wall_time_s']:.0f} |")
    print(f"compute fraction {pair['compute_fraction']:.1%}; wall-clock fraction {pair['wallclock_fraction']:.1%} "
          f"(gap {pair['gap_points']:+.1f} points); training-time fraction {pair['train_time_fraction']:.1%} "
          f"(gap {pair['train_gap_points']:+.1f} points)")
    print(f"images/s on {args.speed_per_class}/class, batch {args.batch_size}, median of epochs 2..{args.speed_epochs}:"
          f" bare loop {speed['bare_loop']['img_per_s']:.0f}, trainer --dap-select none "
          f"{speed['trainer_none']['img_per_s']:.0f} ({speed['trainer_none_vs_bare']:.3f} of bare), trainer DaP "
          f"{speed['trainer_dap']['img_per_s']:.0f}")
    print(f"wrote {work / f'wallclock-{tag}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
