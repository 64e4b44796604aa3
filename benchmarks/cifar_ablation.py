"""The paper's Table 2(f) on full CIFAR-10 (50,000 train / 10,000 test) with the project's trainer, and Table 4.

Rows, each run for every seed with ``python -m dap_pretrain.train``:

* ``all``          all data, 100% compute (``--dap-select none``)
* ``dap``          Drop-and-Pick, hardest samples kept (``--dap-select hard``)
* ``random``       the same schedule, samples kept uniformly at random (``--dap-select random``)
* ``fewer_epochs`` all data, epochs and LR milestones scaled by DaP's compute (``--epochs-scale F``)
* ``fixed_subset`` a fixed random fraction F of the data for all epochs (``--fixed-subset F``)

F is the DaP run's *measured* compute (its ``run.json``) for the same seed; with ``--jobs > 1`` the rows run
concurrently and F is the planner's compute (measured equals planned unless ``--drop-last``; the table shows
each run's measured compute). ``--table4`` adds the data-redundancy check: ``all`` and ``dap`` on CIFAR-10 reduced
to its first 500 images per class by sorted file name (5,000 train; the test split unchanged).

Schedule rule: the paper's (300 epochs, W=40, I=10, p=0.9, R=150, LR /10 at 150 and 225) with every epoch count
scaled by E'/300 and rounded half up (W, I >= 1); with ``--target-compute F`` p is solved by the planner
(``python -m dap_pretrain plan --dap-target-compute F``) so DaP spends F, else p = 0.9. Each run lives in
``WORK/runs/<setting>/<dataset>/<row>/seed<k>/``; one that holds ``run.json`` is not run again, so a killed
sweep continues. Writes ``ablation.csv`` (one line per run) and ``ablation.png`` (top-1 vs measured compute,
one point per run) next to the runs and prints the table (mean +- sample std over seeds).

    .venv/bin/python benchmarks/cifar_ablation.py                 # the CPU sweep (see docs/RESULTS.md)
    .venv/bin/python benchmarks/cifar_ablation.py --table4 --report   # print/plot what has finished
    .venv/bin/python benchmarks/cifar_ablation.py --dry-run      # toy size, seconds, same code paths
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402  (benchmarks/ is not a package)
    CIFAR_CANDIDATES,
    CIFAR_TARBALLS,
    DEFAULT_WORK_DIR,
    REPO,
    BenchmarkError,
    child_env,
    cifar_folder,
    compressed_schedule,
    find_dir,
    machine_info,
    mean_std,
    run_trainer,
    schedule_flags,
)

ROWS = ("all", "dap", "random", "fewer_epochs", "fixed_subset")
LABELS = {"all": "all data (100%)", "dap": "DaP (hard)", "random": "random drop",
          "fewer_epochs": "all data, fewer epochs", "fixed_subset": "fixed random subset"}
DATASETS = {"cifar10": None, "cifar10_500pc": 500}  # train images kept per class (None: all 5,000)


def resolve_setting(epochs: int, target_compute: float | None, num_samples: int = 50_000) -> dict:
    """The compressed schedule, with p solved for ``target_compute`` if given, and the planner's compute."""
    sched = compressed_schedule(epochs)
    cmd = [sys.executable, "-m", "dap_pretrain", "plan", "--json", "--num-samples", str(num_samples), "--epochs",
           str(epochs), "--dap-warmup", str(sched["warmup"]), "--dap-interval", str(sched["interval"]),
           "--dap-reuse", str(sched["reuse"])]
    cmd += ["--dap-target-compute", str(target_compute)] if target_compute else ["--dap-keep", str(sched["keep"])]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=child_env(None))
    if out.returncode:
        raise BenchmarkError(f"planner failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    planned = json.loads(out.stdout)
    sched["keep"] = planned["dap"]["keep"]
    sched["planned_compute"] = planned["compute_fraction"]
    sched["subset_sizes"] = planned["subset_sizes"]
    return sched


def row_flags(row: str, compute: float | None) -> list[str]:
    """Trainer flags that turn the common DaP command into ``row``."""
    return {"all": ["--dap-select", "none"], "dap": ["--dap-select", "hard"], "random": ["--dap-select", "random"],
            "fewer_epochs": ["--epochs-scale", f"{compute:.6f}"] if compute else [],
            "fixed_subset": ["--fixed-subset", f"{compute:.6f}"] if compute else []}[row]


def _run_one(task: dict, compute: float | None, threads: int | None, deadline: float | None) -> dict:
    flags = task["flags"] + row_flags(task["row"], compute)
    timeout = None if deadline is None else max(1.0, deadline - time.monotonic())
    summary = run_trainer(task["out"], flags, threads=threads, timeout=timeout)
    return {**summary, "data_dir": summary.get("dataset"), **{k: task[k] for k in ("dataset", "row", "seed")},
            "output": str(task["out"])}


def sweep(*, roots: dict[str, Path], sched: dict, seeds: list[int], base_flags: list[str], runs_dir: Path,
          rows: tuple[str, ...] = ROWS, jobs: int = 1, threads: int | None = None,
          deadline: float | None = None) -> list[dict]:
    """Runs (or reuses) every ``(dataset, seed, row)``; returns one record per run (run.json plus the keys).

    ``roots`` maps a dataset tag to its folder; the reduced datasets run only ``all`` and ``dap``. Order is
    seed-major, so a sweep stopped early still holds whole seeds. A run still going at ``deadline``
    (``time.monotonic()``) is killed and raises :class:`BenchmarkError`.
    """
    tasks = []
    for seed in seeds:
        for dataset, root in roots.items():
            for row in (rows if dataset == "cifar10" else ("all", "dap")):
                flags = [*base_flags, *schedule_flags(sched), "--data-dir", str(root), "--seed", str(seed)]
                tasks.append(dict(dataset=dataset, row=row, seed=seed, flags=flags,
                                  out=runs_dir / dataset / row / f"seed{seed}"))
    needs_f = ("fewer_epochs", "fixed_subset")
    if jobs > 1:  # concurrent: F from the planner
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(_run_one, t, sched["planned_compute"], threads, deadline) for t in tasks]
            return [f.result() for f in futures]
    records, dap_compute = [], {}
    for t in sorted(tasks, key=lambda t: (t["seed"], t["row"] in needs_f)):  # DaP before the rows that need F
        rec = _run_one(t, dap_compute.get((t["dataset"], t["seed"])), threads, deadline)
        if t["row"] == "dap":
            dap_compute[(t["dataset"], t["seed"])] = rec["compute_fraction_measured"]
        records.append(rec)
    return records


def collect(runs_dir: Path) -> list[dict]:
    """Every finished run below ``runs_dir`` (``<dataset>/<row>/seed<k>/run.json``)."""
    out = []
    for path in sorted(runs_dir.glob("*/*/seed*/run.json")):
        dataset, row, seed = path.parts[-4], path.parts[-3], int(path.parts[-2][4:])
        summary = json.loads(path.read_text())
        out.append({**summary, "data_dir": summary.get("dataset"), "dataset": dataset, "row": row, "seed": seed,
                    "output": str(path.parent)})
    return out


CSV_FIELDS = ("dataset", "row", "seed", "model", "epochs", "top1", "top5", "compute_fraction_planned",
              "compute_fraction_measured", "samples_trained", "wall_time_s", "dap_keep", "dap_select", "output")


def write_csv(records: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({**r, "dap_keep": r["dap"].get("keep"), "dap_select": r["dap"].get("select")})


def table(records: list[dict], dataset: str = "cifar10") -> list[str]:
    """Markdown table: per row, n seeds, top-1 mean +- std, difference to DaP, measured compute, wall-clock.

    "vs DaP" is the difference of the means; "paired" is the mean +- std over seeds of (row - DaP) for the seeds
    both ran (the same seed gives both the same initial weights), with the number of seeds where DaP is ahead.
    """
    by_row = {row: [r for r in records if r["dataset"] == dataset and r["row"] == row] for row in ROWS}
    dap_mean = mean_std([r["top1"] for r in by_row["dap"]])[0]
    dap_by_seed = {r["seed"]: r["top1"] for r in by_row["dap"]}
    lines = ["| row | n | top-1 (%) mean ± std | vs DaP | paired vs DaP (DaP ahead) | compute (measured) | "
             "wall-clock (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row, rs in by_row.items():
        if not rs:
            continue
        m, s = mean_std([r["top1"] for r in rs])
        c = mean_std([r["compute_fraction_measured"] for r in rs])[0]
        w = mean_std([r["wall_time_s"] for r in rs])[0]
        diff = paired = ""
        if row != "dap":
            diff = f"{m - dap_mean:+.2f}"
            d = [r["top1"] - dap_by_seed[r["seed"]] for r in rs if r["seed"] in dap_by_seed]
            if d:
                pm, ps = mean_std(d)
                paired = f"{pm:+.2f} ± {ps:.2f} ({sum(x < 0 for x in d)}/{len(d)})"
        lines.append(f"| {LABELS[row]} | {len(rs)} | {m:.2f} ± {s:.2f} | {diff} | {paired} | {c:.1%} | {w:.0f} |")
    return lines


def table4(records: list[dict]) -> list[str]:
    """Markdown table: all data vs DaP per dataset (the paper's Table 4)."""
    lines = ["| dataset | n | all data top-1 | DaP top-1 | DaP − all | DaP compute |", "|---|---:|---:|---:|---:|---:|"]
    for dataset in DATASETS:
        a = [r["top1"] for r in records if r["dataset"] == dataset and r["row"] == "all"]
        d = [r for r in records if r["dataset"] == dataset and r["row"] == "dap"]
        if not a or not d:
            continue
        (am, as_), (dm, ds) = mean_std(a), mean_std([r["top1"] for r in d])
        c = mean_std([r["compute_fraction_measured"] for r in d])[0]
        lines.append(f"| {dataset} | {min(len(a), len(d))} | {am:.2f} ± {as_:.2f} | {dm:.2f} ± {ds:.2f} | "
                     f"{dm - am:+.2f} | {c:.1%} |")
    return lines


def plot(records: list[dict], path: Path, title: str) -> None:
    """Top-1 vs measured compute, one point per run, one colour per row (one panel per dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in records)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    markers = dict(zip(ROWS, "osD^v", strict=True))
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for i, row in enumerate(ROWS):
            rs = [r for r in records if r["dataset"] == dataset and r["row"] == row]
            if rs:  # rows at the same compute are nudged apart by 0.4 points each, for legibility only
                ax.scatter([100 * r["compute_fraction_measured"] + 0.4 * (i - 2) for r in rs],
                           [r["top1"] for r in rs], label=LABELS[row], marker=markers[row], alpha=0.8)
        ax.set(xlabel="compute (% of all-data samples, measured; rows nudged apart by 0.4 each)",
               ylabel="test top-1 (%)", title=dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(records: list[dict], *, out_dir: Path, sched: dict, model: str, info: dict, with_table4: bool) -> None:
    """Writes ablation.csv / ablation.png into ``out_dir`` and prints the tables."""
    if not records:
        print(f"no finished runs under {out_dir}")
        return
    write_csv(records, out_dir / "ablation.csv")
    title = (f"{model}, {sched['epochs']} epochs, W={sched['warmup']} I={sched['interval']} p={sched['keep']:.4f} "
             f"R={sched['reuse']}; {info['cpu'] if not info['gpu'] else info['gpu']}; torch {info['torch']}")
    plot(records, out_dir / "ablation.png", title)
    all_top1 = mean_std([r["top1"] for r in records if r["dataset"] == "cifar10" and r["row"] == "all"])
    print(f"\nTable 2(f), CIFAR-10 50,000/10,000 -- {title}")
    print(f"network {model}: top-1 at 100% = {all_top1[0]:.2f} ± {all_top1[1]:.2f}; planned DaP compute "
          f"{sched['planned_compute']:.2%}; top-1 is the final epoch's on the 10,000 test images")
    print("\n".join(table(records)))
    if with_table4:
        print("\nTable 4, data redundancy (cifar10_500pc = first 500 train images per class by sorted name)")
        print("\n".join(table4(records)))
    print(f"\nwrote {out_dir / 'ablation.csv'} and {out_dir / 'ablation.png'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder holding the CIFAR-10 tarballs (default ../shared/data/cifar10)")
    p.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR / "cifar_ablation"), help="cache and runs (not the repo)")
    p.add_argument("--model", default="test_resnet", help="timm model (0.37M-param test_resnet: fits 2 CPU cores)")
    p.add_argument("--epochs", type=int, default=15, help="E': the paper's 300 epochs compressed to this many")
    p.add_argument("--target-compute", type=float, default=0.63, help="solve p for this DaP compute (0: p=0.9)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--table4", action="store_true", help="also CIFAR-10 at 500 images/class (all data and DaP)")
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (then F comes from the planner)")
    p.add_argument("--extra", default="", help="more trainer flags, e.g. '--amp --channels-last --device cuda'")
    p.add_argument("--report", action="store_true", help="only collect finished runs, write CSV/PNG, print tables")
    p.add_argument("--dry-run", action="store_true", help="toy size (20 train / 10 test per class, 4 epochs)")
    args = p.parse_args(argv)
    try:
        return _main(args)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    work = Path(args.work_dir).expanduser()
    if args.dry_run:
        work, args.epochs, args.seeds, args.target_compute = work / "dry-run", 4, args.seeds[:2], 0
    sched = resolve_setting(args.epochs, args.target_compute or None)
    tag = f"{args.model}-e{args.epochs}-p{sched['keep']:.4f}-b{args.batch_size}" + ("-dry" if args.dry_run else "")
    runs_dir = work / "runs" / tag
    info = machine_info()
    if not args.report:
        data = find_dir(args.data, CIFAR_CANDIDATES, tuple(CIFAR_TARBALLS.values()))
        per_class = (20, 10) if args.dry_run else (None, None)
        roots = {"cifar10": cifar_folder(data, work, train_per_class=per_class[0], test_per_class=per_class[1])}
        if args.table4:
            roots["cifar10_500pc"] = cifar_folder(data, work, train_per_class=5 if args.dry_run else 500,
                                                  test_per_class=per_class[1])
        print(f"{info}\nsetting {tag}: {json.dumps({k: v for k, v in sched.items() if k != 'subset_sizes'})}\n"
              f"subset sizes per epoch (planner, N=50,000): {sched['subset_sizes']}\nruns in {runs_dir}", flush=True)
        base = ["--model", args.model, "--img-size", "32", "--aug", "cifar", "--train-split", "train", "--val-split",
                "test", "-b", str(args.batch_size), "--lr", str(args.lr), "--momentum", "0.9", "--weight-decay",
                str(args.weight_decay), "--opt", "sgd", "-j", str(args.workers), *args.extra.split()]
        sweep(roots=roots, sched=sched, seeds=args.seeds, base_flags=base, runs_dir=runs_dir,
              rows=tuple(r for r in ROWS if r in args.rows), jobs=args.jobs, threads=args.threads)
    records = [r for r in collect(runs_dir) if r["seed"] in args.seeds or args.report]
    runs_dir.mkdir(parents=True, exist_ok=True)
    report(records, out_dir=runs_dir, sched=sched, model=args.model, info=info, with_table4=args.table4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
