"""Training speed of one trainer process on CIFAR-10 per network: the in-memory path, eager and with --cuda-graph.

Each (network, mode) is one ``python -m dap_pretrain.train`` run of ``--epochs`` all-data epochs on the full
CIFAR-10 train split (50,000 images) decoded into device memory (``--in-memory on``), bf16 autocast,
channels-last, batch 128, SGD; the figure is the trainer's own training images/s (``summary.csv`` ``img_per_s``,
forward + backward + update + DaP recording, no evaluation) of the LAST epoch, so cuDNN autotuning and the graph
capture in epoch 1 are left out. The first epoch's mean training loss of both modes is printed side by side: the
same seed gives both the same batches and augmentation, so they agree closely if the captured step is right.

    python benchmarks/fastpath_speed.py --networks cifar_resnet20 cifar_resnet110     # on a GPU
    python benchmarks/fastpath_speed.py --dry-run                                     # CPU, toy size, eager only

Writes ``$OUT/fastpath_speed.json`` (``./gpu_results`` when OUT is unset) after every run; bad input or a run that
fails: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CIFAR_CANDIDATES,
    CIFAR_TARBALLS,
    DEFAULT_WORK_DIR,
    REPO,
    BenchmarkError,
    cifar_folder,
    find_dir,
    machine_info,
    read_summary_csv,
    run_trainer,
)

CONFIG = REPO / "configs/pretrain/cifar/cifar10_resnet110_full.yaml"  # the paper's CIFAR settings, all data


def trainer_flags(*, network: str, data_dir: Path, epochs: int, device: str, graph: bool) -> list[str]:
    """Flags of one speed run (the paper's CIFAR config, the fast path, evaluation only at the end)."""
    flags = [
        "--config",
        str(CONFIG),
        "--model",
        network,
        "--dataset",
        "",
        "--data-dir",
        str(data_dir),
        "--train-split",
        "train",
        "--val-split",
        "test",
        "--epochs",
        str(epochs),
        "--dap-reuse",
        "--in-memory",
        "on",
        "-j",
        "4",
        "--eval-interval",
        "1000",
        "-vb",
        "1000",
        "--log-interval",
        "100000",
        "--device",
        device,
        "--seed",
        "0",
    ]
    if device != "cpu":
        flags += ["--amp", "--amp-dtype", "bfloat16", "--channels-last"]
    return flags + (["--cuda-graph"] if graph else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="CIFAR-10 tarball folder (default ../shared/data/cifar10)")
    p.add_argument("--networks", nargs="+", default=["cifar_resnet20", "cifar_resnet110"])
    p.add_argument("--modes", nargs="+", choices=("eager", "graph"), default=["eager", "graph"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=150, help="all runs together; a run past it is killed")
    p.add_argument(
        "--work-dir",
        default=str(DEFAULT_WORK_DIR / "paper_tables"),
        help="data cache (shared with paper_tables.py) and runs",
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, 20 images per class, eager only")
    args = p.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.networks, args.modes, args.epochs = ["cifar_resnet20"], ["eager"], 2
    try:
        data = find_dir(args.data, CIFAR_CANDIDATES, tuple(CIFAR_TARBALLS.values()))
        per = (20, 10) if args.dry_run else (None, None)
        root = cifar_folder(data, Path(args.work_dir), train_per_class=per[0], test_per_class=per[1])
        out = Path(os.environ.get("OUT") or "gpu_results")
        out.mkdir(parents=True, exist_ok=True)
        results = {"machine": machine_info(), "epochs": args.epochs, "runs": []}
        deadline = time.monotonic() + args.budget_s
        for network in args.networks:
            for mode in args.modes:
                flags = trainer_flags(
                    network=network, data_dir=root, epochs=args.epochs, device=device, graph=mode == "graph"
                )
                run_dir = Path(args.work_dir) / "speed" / f"{network}-{mode}"
                run_trainer(run_dir, flags, rerun=True, timeout=max(1.0, deadline - time.monotonic()))
                rows = read_summary_csv(run_dir)
                results["runs"].append(
                    {
                        "network": network,
                        "mode": mode,
                        "img_per_s": rows[-1]["img_per_s"],
                        "epoch_img_per_s": [r["img_per_s"] for r in rows],
                        "epoch1_train_loss": rows[0]["train_loss"],
                    }
                )
                (out / "fastpath_speed.json").write_text(json.dumps(results, indent=2, default=str))
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpu = results["machine"]["gpu"] or results["machine"]["cpu"]
    print(f"\n{gpu}, torch {results['machine']['torch']}: trainer images/s, last of {args.epochs} epochs")
    print("| network | mode | img/s | s per 50k epoch | epoch-1 train loss |\n|---|---|---:|---:|---:|")
    for r in results["runs"]:
        print(
            f"| {r['network']} | {r['mode']} | {r['img_per_s']:.0f} | {50_000 / r['img_per_s']:.2f} | "
            f"{r['epoch1_train_loss']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
