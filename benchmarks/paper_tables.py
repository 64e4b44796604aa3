"""The paper's Table 2(f) on full CIFAR-10 at the paper's own schedule, grown across GPU jobs of under 10 minutes.

Every run is ``python -m dap_pretrain.train --config configs/pretrain/cifar/cifar10_resnet110_dap63.yaml`` (300
epochs, LR 0.1 /10 at 150 and 225, batch 128, SGD momentum 0.9, wd 1e-4; DaP W=40, I=10, p=0.9, all data picked
up again at 150) with ``--model NET`` and an ImageFolder of CIFAR-10 (50,000 train / 10,000 test). Rows:

* ``all``          all data, 100% compute (``--dap-select none``)
* ``dap``          Drop-and-Pick, hardest samples kept (``--dap-select hard``)
* ``random``       DaP's schedule, samples kept uniformly at random (``--dap-select random``)
* ``fewer_epochs`` all data for round(F x 300) epochs, LR milestones scaled by F (``--epochs-scale F``)
* ``fixed_subset`` one fixed random fraction F of the data for all 300 epochs (``--fixed-subset F``)
* ``infobatch``    InfoBatch (delta=0.875), r set each epoch so the run spends F (``--infobatch-target-compute F``)

F is the planner's compute for DaP on this schedule (``python -m dap_pretrain plan``): 62.67%.

A 300-epoch run does not fit in one GPU job, so the sweep is made to be cut and continued:

* ``--budget-s``: at the deadline every running trainer gets SIGTERM (SIGKILL 5 s later) and the sweep ends
  normally; the trainer writes ``last.pth.tar`` atomically after every epoch, so at most one epoch is lost. No run
  starts with under 30 s left.
* ``WORK/runs/<network>/<row>/seed<k>/``: a folder holding ``run.json`` is finished; one holding ``last.pth.tar``
  only is continued with ``--resume`` and the same flags (checked against its ``flags.json`` before anything runs).
* ``--csv`` (default ``docs/table2f_e300.csv``): one line per finished (network, row, seed), appended the moment
  it finishes; a triple already there is never run again, so the table grows job by job. Columns: network, row,
  seed, epochs, top1, compute_measured, wall_s (the trainer's, resumed epochs included), device (GPU name or
  ``cpu: <model>``), commit (run.json's, 10 characters; ``$DAP_GIT_COMMIT`` where the copy has no ``.git``).
* ``--state-out DIR``: every unfinished run (last.pth.tar, args.yaml, summary.csv, log.txt, flags.json) packed
  into at most 6 gzipped ``paper_state_NN.tar.gz`` of at most 15 MiB each, plus ``paper_tables.json`` (this job's runs,
  img/s) and a copy of the CSV: 8 files, what a GPU job can send back. ``--state-in DIR`` unpacks such tars
  before the sweep (never over a run folder that has finished here).

Runs go ``--jobs`` at a time in seed-major order (seed 0's rows for the first network first), the next starting as
soon as one ends, so a sweep cut short holds the earliest seeds furthest along. ``--mode together`` (the default on
cuda) trains all of them in one ``python -m dap_pretrain.multirun --jobs`` process, a thread and CUDA stream per
run, so kernels of different runs overlap (H100, cifar_resnet20, 6 runs: about 17,200 img/s each, against about
8,800 as 6 processes, which the GPU time-slices; docs/RESULTS.md section 7); ``--mode processes`` starts a trainer
process per run. ``--report`` prints the table from the CSV (mean +- sample std over seeds, the
difference to DaP paired by seed) beside the paper's numbers.

    bash benchmarks/paper_tables.sh --jobs 6 --budget-s 480 --state-in benchmarks/state/table2f_e300 --state-out $OUT
    .venv/bin/python benchmarks/paper_tables.py --report          # the table so far
    .venv/bin/python benchmarks/paper_tables.py --dry-run         # CPU, toy size, same code paths

The sweep's state between sessions lives in the repo, in ``benchmarks/state/table2f_e300/`` (about 13 MB gzipped for six
cifar_resnet20 runs): a job is ``--state-in benchmarks/state/table2f_e300 --state-out $OUT``; afterwards copy
``$OUT/table2f_e300.csv`` over ``docs/table2f_e300.csv``, replace the folder's tars with ``$OUT/paper_state_*.tar.gz``
(and ``paper_tables.json`` as ``last_job.json``) and commit both. Set ``DAP_GIT_COMMIT=$(git rev-parse HEAD)``
in the GPU command: the copy of the repo there may carry a stale ``.git``. ``--dry-run`` (4 epochs of 20
train / 10 test images per class, ``test_resnet``, one seed, on the CPU) starts from an empty ``WORK/dry-run``,
which also holds its CSV unless ``--csv`` is given.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cifar_ablation  # noqa: E402  (benchmarks/ is not a package)
from common import (  # noqa: E402
    CIFAR_CANDIDATES,
    CIFAR_TARBALLS,
    DEFAULT_WORK_DIR,
    PAPER_CIFAR,
    REPO,
    BenchmarkError,
    child_env,
    cifar_folder,
    find_dir,
    machine_info,
    mean_std,
    read_summary_csv,
    schedule_flags,
)

ROWS = ("all", "dap", "random", "fewer_epochs", "fixed_subset", "infobatch")
LABELS = {**cifar_ablation.LABELS, "infobatch": "InfoBatch (r set for F)"}
NETWORKS = ("cifar_resnet20", "cifar_resnet110")
CONFIG = "configs/pretrain/cifar/cifar10_resnet110_dap63.yaml"
CSV_COLUMNS = ("network", "row", "seed", "epochs", "top1", "compute_measured", "wall_s", "device", "commit")
DEFAULT_CSV = REPO / "docs" / "table2f_e300.csv"
# Table 2(f) of the paper: ResNet-110, CIFAR-10, top-1 (%); "all" is Table 2's all-data line. No InfoBatch row.
PAPER_2F = {"all": 94.54, "dap": 94.63, "random": 93.96, "fewer_epochs": 94.43, "fixed_subset": 92.21}
STATE_FILES = ("last.pth.tar", "args.yaml", "summary.csv", "log.txt", "flags.json")
STATE_TAR_LIMIT = 15 * 2**20  # bytes per tar: a file coming back from a GPU job may hold 16 MiB
STATE_MAX_TARS = 6  # + paper_tables.json + the CSV copy = the 8 files a GPU job may send back
STATE_NAME = re.compile(r"paper_state_\d\d\.tar(\.gz)?")  # .tar from jobs before gzip
MEMBER = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]*)/([a-z_]+)/seed(\d+)/(" + "|".join(map(re.escape, STATE_FILES)) + ")")
START_MARGIN_S = 30.0  # no run starts with less left: start-up took ~30 s (6 at once on an H100, 60k JPEGs decoded)
STATE_TRAVEL_WARN = 60 * 2**20  # a device call carries a 64 MiB working tree: more state than this will not travel
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this
KILLED = (-signal.SIGTERM, -signal.SIGKILL, -signal.SIGINT)  # a trainer killed from outside: its checkpoint stands
EVAL_INTERVAL = 100_000  # epochs: larger than any run, so only the final epoch is evaluated
DRY_PER_CLASS = (20, 10)  # train / test images per class for --dry-run
DRY_EPOCHS = 4


def row_flags(row: str, compute: float) -> list[str]:
    """Trainer flags that turn the common command into ``row`` (F = ``compute``)."""
    if row == "infobatch":
        return ["--dap-select", "infobatch", "--infobatch-target-compute", f"{compute:.6f}"]
    return cifar_ablation.row_flags(row, compute)


def speed_flags(device: str) -> list[str]:
    """Data on the device, only the last epoch evaluated; bf16 autocast and CUDA graphs on a GPU only."""
    flags = f"--in-memory on --eval-interval {EVAL_INTERVAL} -vb 1000 -j 4 --no-plot --log-interval 100000".split()
    flags.append("--channels-last")
    if device.startswith("cuda"):
        flags += "--amp --amp-dtype bfloat16 --cuda-graph".split()
    return flags


def trainer_flags(
    *, network: str, row: str, seed: int, data_root: Path, compute: float, device: str, schedule: dict | None = None
) -> list[str]:
    """The whole trainer command line but ``--output``/``--resume``; ``schedule`` (dry run) overrides the config's."""
    flags = ["--config", CONFIG, "--model", network, "--dataset", "", "--data-dir", str(data_root)]
    flags += [*"--train-split train --val-split test".split(), "--seed", str(seed), "--device", device]
    flags += speed_flags(device) + (schedule_flags(schedule) if schedule else [])
    return flags + row_flags(row, compute)


def portable(flags: list[str]) -> list[str]:
    """``flags`` without what may differ between jobs and cannot change results: what a resume must match.

    The data folder's path differs between machines; ``-j`` (loader processes, which only decode the data once on
    the in-memory path) may be tuned per machine.
    """
    out, skip = [], False
    for i, f in enumerate(flags):
        if skip:
            skip = False
            continue
        if f in ("-j", "--workers"):
            skip = True
            continue
        out.append("<data>" if i and flags[i - 1] == "--data-dir" else f)
    return out


@dataclass
class Run:
    """One (network, row, seed) of the sweep and what this job did with it."""

    network: str
    row: str
    seed: int
    out: Path
    flags: list
    status: str = "pending"  # finished, stopped (budget), failed, not started
    epoch_start: int = 0  # epochs done when this job reached it
    epoch_reached: int = 0
    started_at: float | None = None  # time.time() of this job's launch
    seconds: float = 0.0  # the trainer's wall-clock in this job
    error: str | None = None
    summary: dict | None = None  # run.json

    @property
    def key(self) -> tuple:
        return (self.network, self.row, self.seed)

    @property
    def name(self) -> str:
        return f"{self.network}/{self.row}/seed{self.seed}"


def plan_runs(*, networks, rows, seeds, runs_dir: Path, flags_for) -> list[Run]:
    """Every (network, row, seed), seed-major: seed 0's rows for the first network first."""
    return [
        Run(net, row, seed, runs_dir / net / row / f"seed{seed}", flags_for(net, row, seed))
        for seed in seeds
        for net in networks
        for row in rows
    ]


# ---- results CSV ---------------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict]:
    """The results CSV's lines (numbers parsed), [] if it does not exist; another header is a BenchmarkError."""
    if not path.is_file() or path.stat().st_size == 0:
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise BenchmarkError(f"{path} has columns {reader.fieldnames}, not {list(CSV_COLUMNS)}; pass another --csv")
        rows = list(reader)
    num = {"seed": int, "epochs": int, "top1": float, "compute_measured": float, "wall_s": float}
    return [{k: (num[k](v) if k in num and v != "" else v) for k, v in r.items()} for r in rows]


def append_csv(path: Path, record: dict) -> None:
    """Appends one line (the header first if the file is new) and flushes it to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if f.tell() == 0:
            w.writeheader()
        w.writerow(record)
        f.flush()
        os.fsync(f.fileno())


def csv_record(run: Run, summary: dict, device: str) -> dict:
    """A CSV line from a finished run's ``run.json``."""
    commit = summary.get("git_commit") or os.environ.get("DAP_GIT_COMMIT") or "unknown"
    top1 = summary.get("top1")
    return {
        "network": run.network,
        "row": run.row,
        "seed": run.seed,
        "epochs": summary["epochs"],
        "top1": "" if top1 is None else f"{top1:.2f}",
        "compute_measured": f"{summary['compute_fraction_measured']:.6f}",
        "wall_s": f"{summary['wall_time_s']:.1f}",
        "device": device,
        "commit": commit[:10],
    }


# ---- state across GPU jobs -----------------------------------------------------------------------------------


def _tar_bytes(sizes: list[int]) -> int:
    """Bytes of an uncompressed tar of files of ``sizes`` (header + 512-byte blocks each, end marker, 10 KiB record)."""
    n = sum(512 + -(-s // 512) * 512 for s in sizes) + 1024
    return -(-n // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def bin_runs(sizes: dict[str, int], *, limit: int = STATE_TAR_LIMIT, max_bins: int = STATE_MAX_TARS) -> list[list]:
    """Groups runs into tars: first fit, largest first. ``sizes`` maps a run to its files' sizes (a list)."""
    bins: list[list] = []
    for name in sorted(sizes, key=lambda n: -_tar_bytes(sizes[n])):
        if _tar_bytes(sizes[name]) > limit:
            raise BenchmarkError(
                f"run {name} takes {_tar_bytes(sizes[name]) / 2**20:.1f} MiB, over the "
                f"{limit / 2**20:.0f} MiB a state tar may hold; it cannot travel between GPU jobs"
            )
        for b in bins:
            if _tar_bytes([s for n in (*b, name) for s in sizes[n]]) <= limit:
                b.append(name)
                break
        else:
            bins.append([name])
    if len(bins) > max_bins:
        raise BenchmarkError(
            f"{len(sizes)} unfinished runs need {len(bins)} state tars, over {max_bins}; "
            "run fewer at once (--jobs, --networks)"
        )
    return bins


def unfinished_runs(runs_dir: Path, done: set) -> list[Path]:
    """Run folders below ``runs_dir`` holding ``last.pth.tar`` but no ``run.json``, not in ``done``, seed-major."""
    out = [p.parent for p in runs_dir.glob("*/*/seed*/last.pth.tar") if not (p.parent / "run.json").exists()]
    out = [p for p in out if (p.parts[-3], p.parts[-2], int(p.parts[-1][4:])) not in done]
    return sorted(out, key=lambda p: (int(p.parts[-1][4:]), p.parts[-3], p.parts[-2]))


def pack_state(
    folders: list[Path], runs_dir: Path, out_dir: Path, *, limit: int = STATE_TAR_LIMIT, max_tars: int = STATE_MAX_TARS
) -> list[Path]:
    """Writes ``out_dir/paper_state_NN.tar.gz`` (each <= ``limit`` bytes) of ``folders``' state files; returns the tars.

    Stale ``paper_state_*.tar`` in ``out_dir`` are removed first; nothing is written if the runs do not fit.
    """
    files = {str(f.relative_to(runs_dir)): [f / n for n in STATE_FILES if (f / n).is_file()] for f in folders}
    bins = bin_runs(
        {n: [p.stat().st_size for p in paths] for n, paths in files.items()}, limit=limit, max_bins=max_tars
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("paper_state_*.tar*"):
        old.unlink()
    tars = []
    for i, names in enumerate(bins):
        dest = out_dir / f"paper_state_{i:02d}.tar.gz"
        tmp = dest.with_name(f".{dest.name}.tmp")
        # USTAR: no extension headers, so the uncompressed size is as planned; gzip only shrinks it (about 0.57x for
        # cifar_resnet20 runs: sorted subset indices and reset loss sums compress well), so the limit still holds.
        with tarfile.open(tmp, "w:gz", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(names):
                for p in files[name]:
                    tar.add(p, arcname=f"{name}/{p.name}", recursive=False)
        os.replace(tmp, dest)
        if dest.stat().st_size > limit:  # the size rule in _tar_bytes is wrong: a bug
            raise RuntimeError(f"{dest} is {dest.stat().st_size} bytes, over {limit}")
        tars.append(dest)
    return tars


def unpack_state(state_dir: Path, runs_dir: Path, done: set) -> list[str]:
    """Unpacks ``state_dir/paper_state_NN.tar[.gz]`` into ``runs_dir``; returns the runs restored.

    A run finished here (its folder holds ``run.json``) or listed in ``done`` is left alone. Only the state files
    of ``<network>/<row>/seed<k>/`` are taken; any other member is a BenchmarkError (not our tar).
    """
    if not state_dir.is_dir():
        raise BenchmarkError(f"--state-in {state_dir} is not a folder; omit --state-in on a sweep's first job")
    restored = set()
    for path in sorted(p for p in state_dir.iterdir() if STATE_NAME.fullmatch(p.name)):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                match = MEMBER.fullmatch(m.name)
                if not match or not m.isfile():
                    raise BenchmarkError(f"{path} holds {m.name!r}, not a paper_tables run file; remove the tar")
                net, row, seed = match.group(1), match.group(2), int(match.group(3))
                folder = runs_dir / net / row / f"seed{seed}"
                if (net, row, seed) in done or (folder / "run.json").exists():
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".{match.group(4)}.tmp"
                with tar.extractfile(m) as src, tmp.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, folder / match.group(4))
                restored.add(f"{net}/{row}/seed{seed}")
    return sorted(restored)


def checkpoint_epoch(path: Path) -> int:
    """Epochs completed in a trainer checkpoint."""
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception as e:  # a foreign or broken file: the trainer could not resume it either
        raise BenchmarkError(f"cannot read {path} ({type(e).__name__}); remove its folder to start over") from None


# ---- the sweep -----------------------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen, grace: float = KILL_GRACE_S) -> None:
    """SIGTERM, then SIGKILL if it is still alive ``grace`` seconds later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Sweep:
    """Runs trainers ``jobs`` at a time until done or ``deadline`` (``time.monotonic()``); appends to ``csv_path``.

    ``stop`` (an Event, set by SIGTERM/Ctrl-C in :func:`main`) ends it like the deadline does. ``trainer`` is the
    command before the flags (tests put a stand-in there); no run starts with under ``start_margin`` seconds left.
    """

    def __init__(
        self,
        runs: list[Run],
        *,
        csv_path: Path,
        device: str,
        deadline: float,
        jobs: int,
        threads: int,
        t0: float,
        trainer: tuple = (sys.executable, "-m", "dap_pretrain.train"),
        start_margin: float = START_MARGIN_S,
        grace: float = KILL_GRACE_S,
        together: bool = False,
        multirun: tuple = (sys.executable, "-m", "dap_pretrain.multirun"),
    ):
        self.runs, self.csv_path, self.device, self.deadline = runs, csv_path, device, deadline
        self.jobs, self.threads, self.t0 = jobs, threads, t0
        self.trainer, self.start_margin, self.grace = list(trainer), start_margin, grace
        self.together = together  # True: all runs in one dap_pretrain.multirun process, `jobs` training at once
        self.multirun = list(multirun)
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.in_csv = {(r["network"], r["row"], r["seed"]) for r in read_csv(csv_path)}

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.0f} s] {msg}", flush=True)

    def run(self) -> None:
        if self.together:
            return self._run_together()
        with ThreadPoolExecutor(self.jobs) as pool:
            futures = [pool.submit(self._one, r) for r in self.runs]
            for f in futures:
                while True:
                    try:
                        f.result()
                        break
                    except KeyboardInterrupt:  # stop the trainers, keep what they saved, pack it
                        self.stop.set()

    def _one(self, run: Run) -> None:
        try:
            self._step(run)
        except BenchmarkError as e:
            run.status, run.error = "failed", str(e)
            self.log(f"FAILED {run.name}: {e}")
        except BaseException:
            self.stop.set()  # a bug: stop the other trainers too, and keep the traceback
            raise

    def _step(self, run: Run) -> None:
        done = run.out / "run.json"
        if done.is_file():
            run.epoch_start = json.loads(done.read_text())["epochs"]
        elif self.stop.is_set() or self.deadline - time.monotonic() < self.start_margin:
            run.status = "not started"
            run.epoch_reached = run.epoch_start = _epoch_of(run.out)
            return
        else:
            self._train(run)
        if done.is_file():
            self._finish(run)

    def _train(self, run: Run) -> None:
        ckpt = run.out / "last.pth.tar"
        run.epoch_start = _epoch_of(run.out)
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "flags.json").write_text(json.dumps(run.flags))
        cmd = [
            *self.trainer,
            *run.flags,
            "--output",
            str(run.out),
            *(["--resume", str(ckpt)] if ckpt.is_file() else ["--overwrite"]),
        ]
        self.log(f"start {run.name}" + (f" (resume after epoch {run.epoch_start})" if ckpt.is_file() else ""))
        run.started_at, t0 = time.time(), time.monotonic()
        with (run.out / "trainer.log").open("a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(self.threads))
            stopped = self._wait(proc)
        run.seconds = time.monotonic() - t0
        run.epoch_reached = _epoch_of(run.out)
        if proc.returncode == 0 and (run.out / "run.json").is_file():
            return
        if stopped or self.stop.is_set() or proc.returncode in KILLED:
            run.status = "stopped"
            self.log(f"stopped {run.name} at epoch {run.epoch_reached} (budget or signal)")
        else:
            tail = (run.out / "trainer.log").read_text().strip().splitlines()[-3:]
            run.status, run.error = "failed", f"exit {proc.returncode}: {' | '.join(tail)}"
            self.log(f"FAILED {run.name}: {run.error}")

    def _run_together(self) -> None:
        """All unfinished runs in one multirun process, ``jobs`` training at once, the next starting as one ends."""
        pending = []
        for run in self.runs:
            if (run.out / "run.json").is_file():
                self._step(run)  # finished in an earlier job: into the CSV
            else:
                pending.append(run)
        left = self.deadline - time.monotonic() - self.start_margin
        if not pending or self.stop.is_set() or left < 0:
            for run in pending:
                run.status = "not started"
                run.epoch_reached = run.epoch_start = _epoch_of(run.out)
            return
        try:
            self._train_together(pending, start_until=time.time() + left)
        except KeyboardInterrupt:
            self.stop.set()
        for run in pending:
            if (run.out / "run.json").is_file():
                self._finish(run)

    def _train_together(self, runs: list[Run], *, start_until: float) -> None:
        """One ``dap_pretrain.multirun --jobs`` process; its ``--status`` file says which runs started, when, and
        why one failed. A process that ends badly without a word on a run (it died on import, or crashed) fails
        the runs it had not finished; it is never taken for a budget that ran out."""
        log_path = runs[0].out.parents[2] / f"multirun-{time.time_ns()}.log"
        status_path = log_path.with_suffix(".status.json")
        cmd = [*self.multirun, "--jobs", str(self.jobs), "--start-until", f"{start_until:.3f}"]
        cmd += ["--status", str(status_path)]
        for run in runs:
            ckpt = run.out / "last.pth.tar"
            run.epoch_start = _epoch_of(run.out)
            run.out.mkdir(parents=True, exist_ok=True)
            (run.out / "flags.json").write_text(json.dumps(run.flags))
            resume = ["--resume", str(ckpt)] if ckpt.is_file() else ["--overwrite"]
            cmd += ["--run", shlex.join([*run.flags, "--output", str(run.out), *resume])]
        self.log(
            f"start {len(runs)} runs together, {self.jobs} at a time: "
            + ", ".join(r.name + (f"@{r.epoch_start}" if r.epoch_start else "") for r in runs)
        )
        with log_path.open("a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            env = child_env(self.threads * min(self.jobs, len(runs)))
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
            stopped = self._wait(proc) or self.stop.is_set() or proc.returncode in KILLED
        ended = time.time()
        board = json.loads(status_path.read_text()) if status_path.is_file() else {}
        for run in runs:
            self._together_outcome(
                run, board.get(str(run.out), {}), stopped=stopped, ended=ended, proc=proc, log=log_path
            )

    def _together_outcome(self, run: Run, entry: dict, *, stopped: bool, ended: float, proc, log: Path) -> None:
        """Sets ``run``'s status, times and error from its ``--status`` entry and how the process ended."""
        run.epoch_reached = _epoch_of(run.out)
        state = entry.get("state", "queued")
        if entry.get("started") is not None:
            run.started_at, run.seconds = entry["started"], (entry.get("ended") or ended) - entry["started"]
        if (run.out / "run.json").is_file():
            return  # finished: _finish reads it
        if state == "failed":
            run.status, run.error = "failed", entry.get("error") or "failed (no message)"
        elif state == "not started" or (stopped and state == "queued"):  # multirun: --start-until had passed
            run.status = "not started"
            return
        elif stopped:  # running when the budget or a signal ended the process: its last checkpoint stands
            run.status = "stopped"
            self.log(f"stopped {run.name} at epoch {run.epoch_reached} (budget or signal)")
            return
        else:  # the process ended by itself and left this run queued or running: it died
            lines = [ln for ln in log.read_text().strip().splitlines() if not ln.startswith("$ ")]
            run.status = "failed"
            run.error = f"multirun exit {proc.returncode}: {' | '.join(lines[-3:]) or 'no output'}"
        self.log(f"FAILED {run.name}: {run.error} ({log})")

    def _wait(self, proc: subprocess.Popen) -> bool:
        """Waits for ``proc``; True if it was stopped for the deadline or ``stop``."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0 or self.stop.is_set():
                stop_process(proc, self.grace)
                return True
            try:
                proc.wait(timeout=min(0.5, left))
                return False
            except subprocess.TimeoutExpired:
                continue

    def _finish(self, run: Run) -> None:
        run.summary = json.loads((run.out / "run.json").read_text())
        run.status, run.epoch_reached = "finished", run.summary["epochs"]
        with self.lock:
            if run.key not in self.in_csv:
                append_csv(self.csv_path, csv_record(run, run.summary, self.device))
                self.in_csv.add(run.key)
        top1 = run.summary.get("top1")
        self.log(
            f"finished {run.name}: top-1 {'n/a' if top1 is None else f'{top1:.2f}'}, "
            f"compute {run.summary['compute_fraction_measured']:.4f}, {run.seconds:.0f} s here"
        )


def _epoch_of(folder: Path) -> int:
    ckpt = folder / "last.pth.tar"
    return checkpoint_epoch(ckpt) if ckpt.is_file() else 0


def check_resumable(runs: list[Run]) -> None:
    """Before anything runs: a folder started earlier must have been started with these flags."""
    for run in runs:
        stamp = run.out / "flags.json"
        if (run.out / "last.pth.tar").is_file() or (run.out / "run.json").is_file():
            if stamp.is_file() and portable(json.loads(stamp.read_text())) != portable(run.flags):
                raise BenchmarkError(
                    f"{run.out} was started with other trainer flags (see its flags.json); "
                    "remove the folder or pass the options it was started with"
                )


# ---- summaries -----------------------------------------------------------------------------------------------


def job_samples(run: Run) -> tuple[float, float]:
    """(samples, epoch seconds) this job trained for ``run``: summary.csv rows after ``epoch_start``."""
    path = run.out / "summary.csv"
    if run.started_at is None or not path.is_file() or path.stat().st_mtime < run.started_at:
        return 0.0, 0.0  # not trained here, or killed before its first epoch here ended
    rows = [r for r in read_summary_csv(run.out) if r["epoch"] > run.epoch_start]
    return sum(r["samples_trained"] for r in rows), sum(r["epoch_time_s"] for r in rows)


def job_summary(runs: list[Run], *, sweep_s: float) -> dict:
    """Per run: status, epochs, samples and img/s this job; per network and overall: samples / sweep seconds."""
    out, nets = [], {}
    for run in runs:
        samples, secs = job_samples(run)
        planned = run.summary["epochs"] if run.summary else _planned_epochs(run.out)
        out.append(
            {
                "network": run.network,
                "row": run.row,
                "seed": run.seed,
                "status": run.status,
                "epoch_start": run.epoch_start,
                "epoch_reached": run.epoch_reached,
                "epochs": planned,
                "top1": (run.summary or {}).get("top1"),
                "samples_job": samples,
                "epoch_s_job": round(secs, 1),
                "img_per_s": round(samples / secs, 1) if secs else None,
                "trainer_s": round(run.seconds, 1),
                "error": run.error,
            }
        )
        net = nets.setdefault(run.network, {"runs_trained": 0, "samples_job": 0.0})
        net["runs_trained"] += samples > 0
        net["samples_job"] += samples
    for net in nets.values():
        net["img_per_s"] = round(net["samples_job"] / sweep_s, 1) if sweep_s else None
    total = sum(n["samples_job"] for n in nets.values())
    return {
        "runs": out,
        "per_network": nets,
        "samples_job": total,
        "sweep_s": round(sweep_s, 1),
        "aggregate_img_per_s": round(total / sweep_s, 1) if sweep_s else None,
    }


def _planned_epochs(folder: Path) -> int | None:
    """The run's resolved epochs (its args.yaml), e.g. round(F x 300) for fewer_epochs."""
    import yaml

    path = folder / "args.yaml"
    if not path.is_file():
        return None
    args = yaml.safe_load(path.read_text())
    if args.get("epochs_scale") is None or "baseline_epochs" in args:  # before 2026-11-27 it held the scaled epochs
        return args.get("epochs")
    return max(1, round(args["epochs"] * args["epochs_scale"]))  # as run_config scales them


def summary_lines(summary: dict, *, device: str, total_s: float) -> list[str]:
    """The job's table: one line per run it touched, then img/s per network and overall."""
    lines = [
        f"== paper_tables job on {device}: sweep {summary['sweep_s']:.0f} s, total {total_s:.0f} s ==",
        "| network | row | seed | status | epochs (start -> reached / of) | top-1 | samples here | img/s |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in summary["runs"]:
        top1 = "" if r["top1"] is None else f"{r['top1']:.2f}"
        ips = "" if r["img_per_s"] is None else f"{r['img_per_s']:,.0f}"
        lines.append(
            f"| {r['network']} | {r['row']} | {r['seed']} | {r['status']} | {r['epoch_start']} -> "
            f"{r['epoch_reached']} / {r['epochs'] or '?'} | {top1} | {r['samples_job']:,.0f} | {ips} |"
        )
    for name, n in summary["per_network"].items():
        lines.append(
            f"{name}: {n['runs_trained']} runs trained here, {n['samples_job']:,.0f} samples, "
            f"{n['img_per_s'] or 0:,.0f} img/s (samples / sweep seconds)"
        )
    lines.append(
        f"aggregate: {summary['samples_job']:,.0f} samples in {summary['sweep_s']:.0f} s = "
        f"{summary['aggregate_img_per_s'] or 0:,.0f} img/s over all concurrent runs; "
        f"{summary['samples_job'] / max(total_s, 1e-9):,.0f} img/s over the whole job ({total_s:.0f} s with data "
        "preparation). Per-run img/s: samples / that run's epoch seconds (summary.csv)"
    )
    for r in summary["runs"]:
        if r["error"]:
            lines.append(f"FAILED {r['network']}/{r['row']}/seed{r['seed']}: {r['error']}")
    return lines


# ---- the table -----------------------------------------------------------------------------------------------


def paired_vs_dap(records: list[dict], row: str) -> list[float]:
    """top-1 of ``row`` minus DaP's, for each seed both finished (same seed: same initial weights)."""
    dap = {r["seed"]: r["top1"] for r in records if r["row"] == "dap"}
    return [r["top1"] - dap[r["seed"]] for r in records if r["row"] == row and r["seed"] in dap]


def _mean_pm_std(values: list[float], signed: bool = False) -> str:
    """``mean ± std`` over seeds; the mean alone for one seed, whose spread is unknown (not 0)."""
    m, s = mean_std(values)
    mean = f"{m:+.2f}" if signed else f"{m:.2f}"
    return f"{mean} ± {s:.2f}" if len(values) > 1 else mean


def table2f(records: list[dict], network: str) -> list[str]:
    """Markdown Table 2(f) for ``network`` from CSV records, beside the paper's (ResNet-110) numbers.

    Spreads are sample std over seeds; a row with one seed shows its value without one.
    """
    recs = [r for r in records if r["network"] == network and r["top1"] != ""]
    lines = [
        "| row | epochs | n | top-1 (%) mean ± std | compute (measured) | row − DaP, paired by seed | "
        "DaP ahead | paper top-1 | paper row − DaP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        rs = [r for r in recs if r["row"] == row]
        if not rs:
            continue
        top1 = _mean_pm_std([r["top1"] for r in rs])
        c = mean_std([r["compute_measured"] for r in rs])[0]
        epochs = "/".join(str(e) for e in sorted({r["epochs"] for r in rs}))
        paired = ahead = paper_diff = ""
        d = paired_vs_dap(recs, row) if row != "dap" else []
        if d:
            paired, ahead = _mean_pm_std(d, signed=True), f"{sum(x < 0 for x in d)}/{len(d)}"
        paper = PAPER_2F.get(row)
        if paper is not None and row != "dap":
            paper_diff = f"{paper - PAPER_2F['dap']:+.2f}"
        lines.append(
            f"| {LABELS[row]} | {epochs} | {len(rs)} | {top1} | {c:.1%} | {paired} | {ahead} | "
            f"{'' if paper is None else f'{paper:.2f}'} | {paper_diff} |"
        )
    return lines


FULL_SETTING = f"CIFAR-10 50,000/10,000, the paper's 300-epoch schedule ({CONFIG}), top-1 on the 10,000 test images"
DRY_SETTING = f"DRY RUN: CIFAR-10 {DRY_PER_CLASS[0]}/{DRY_PER_CLASS[1]} images per class, {DRY_EPOCHS} epochs"


def report_lines(records: list[dict], csv_path: Path, setting: str = FULL_SETTING) -> list[str]:
    """Table 2(f) per network in the CSV."""
    if not records:
        return [f"no finished runs in {csv_path}"]
    lines = []
    for net in dict.fromkeys(r["network"] for r in records):
        rs = [r for r in records if r["network"] == net]
        devices, commits = sorted({r["device"] for r in rs}), sorted({r["commit"] for r in rs})
        lines += [
            f"\nTable 2(f), {net}, {setting} (final epoch); devices: {', '.join(devices)}; "
            f"commits: {', '.join(commits)}",
            *table2f(records, net),
        ]
    lines.append(
        "paper: ResNet-110, one run per row (Table 2(f) with Table 2's all-data line); "
        f"DaP ahead = seeds where the row is below DaP. Source: {csv_path}"
    )
    return lines


# ---- entry point ---------------------------------------------------------------------------------------------


def _lock(runs_dir: Path):
    runs_dir.mkdir(parents=True, exist_ok=True)
    f = (runs_dir / ".lock").open("w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise BenchmarkError(
            f"another paper_tables sweep is using {runs_dir}; wait for it or pass another --work-dir"
        ) from None
    return f


def check_config() -> None:
    """The config must be the paper's schedule (300 epochs, W=40, I=10, p=0.9, R=150, LR /10 at 150, 225)."""
    from dap_pretrain.config import load_config

    cfg = load_config(REPO / CONFIG)
    want = dict(
        epochs=PAPER_CIFAR["epochs"],
        dap_warmup=PAPER_CIFAR["warmup"],
        dap_interval=PAPER_CIFAR["interval"],
        dap_keep=PAPER_CIFAR["keep"],
        dap_reuse=[PAPER_CIFAR["reuse"]],
        decay_milestones=list(PAPER_CIFAR["milestones"]),
        lr=0.1,
        batch_size=128,
        momentum=0.9,
        weight_decay=1e-4,
    )
    bad = {k: cfg.get(k) for k, v in want.items() if cfg.get(k) != v}
    if bad:
        raise BenchmarkError(f"{CONFIG} no longer holds the paper's schedule ({bad}); restore it")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--networks", nargs="+", default=None, help=f"timm models (default {' '.join(NETWORKS)}; dry run: test_resnet)"
    )
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (dry run: 0)")
    p.add_argument("--jobs", type=int, default=6, help="trainers at once")
    p.add_argument("--threads", type=int, default=None, help="torch threads per trainer (default: cores / jobs)")
    p.add_argument(
        "--mode",
        choices=("together", "processes"),
        default=None,
        help="together: all runs in one process, --jobs at a time, a thread and CUDA stream each "
        "(dap_pretrain.multirun; kernels of different runs can overlap); processes: a trainer process per run "
        "(the GPU time-slices between them). Default: together on cuda, processes on cpu",
    )
    p.add_argument("--budget-s", type=float, default=480, help="seconds from start; then running trainers stop")
    p.add_argument(
        "--csv",
        default=None,
        help=f"results (default {DEFAULT_CSV.relative_to(REPO)}; dry run: WORK/dry-run/table2f_dry.csv)",
    )
    p.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR / "paper_tables"), help="data cache and runs/")
    p.add_argument(
        "--data",
        default=None,
        help="CIFAR-10 tarball folder (default ../shared/data/cifar10, then shared/data/cifar10)",
    )
    p.add_argument("--state-in", default=None, help="folder of paper_state_NN.tar.gz to continue from")
    p.add_argument("--state-out", default=None, help="folder for paper_state_NN.tar.gz, paper_tables.json, CSV copy")
    p.add_argument("--device", default=None, help="trainer device (default cuda; dry run: cpu)")
    p.add_argument("--report", action="store_true", help="only print Table 2(f) from the CSV")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help=f"CPU, {DRY_PER_CLASS[0]}/{DRY_PER_CLASS[1]} images per "
        f"class, {DRY_EPOCHS} epochs; starts from an empty WORK/dry-run",
    )
    args = p.parse_args(argv)
    dry = args.dry_run
    args.networks = args.networks or (["test_resnet"] if dry else list(NETWORKS))
    args.seeds = args.seeds if args.seeds is not None else ([0] if dry else [0, 1, 2])
    args.device = args.device or ("cpu" if dry else "cuda")
    args.mode = args.mode or ("together" if args.device.startswith("cuda") else "processes")
    work = Path(args.work_dir).expanduser()
    args.runs_dir = work / "dry-run" / "runs" if dry else work / "runs"
    args.csv = Path(args.csv) if args.csv else (work / "dry-run" / "table2f_dry.csv" if dry else DEFAULT_CSV)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    return args


def _validate(args: argparse.Namespace) -> None:
    if args.jobs < 1 or args.budget_s <= 0 or (args.threads or 1) < 1:
        raise BenchmarkError("--jobs and --threads must be >= 1 and --budget-s > 0")
    if min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds):
        raise BenchmarkError(f"--seeds {args.seeds}: each seed once, none negative")
    if len(set(args.networks)) < len(args.networks) or len(set(args.rows)) < len(args.rows):
        raise BenchmarkError("--networks and --rows: each name once")
    import timm

    import dap_pretrain.models  # noqa: F401  (registers cifar_*)

    unknown = [n for n in args.networks if not timm.is_model(n)]
    if unknown:
        raise BenchmarkError(f"unknown network(s) {unknown}; pass timm model names such as {' '.join(NETWORKS)}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BenchmarkError("no CUDA device visible to torch; run on the GPU machine, or pass --dry-run")


def prepare(args: argparse.Namespace) -> tuple[Path, dict]:
    """The ImageFolder and the schedule (the planner's compute F for it)."""
    data = find_dir(args.data, CIFAR_CANDIDATES, tuple(CIFAR_TARBALLS.values()))
    per = DRY_PER_CLASS if args.dry_run else (None, None)
    root = cifar_folder(data, Path(args.work_dir).expanduser(), train_per_class=per[0], test_per_class=per[1])
    n_train = sum(1 for _ in (root / "train").glob("*/*"))
    epochs = DRY_EPOCHS if args.dry_run else PAPER_CIFAR["epochs"]
    if not args.dry_run:
        check_config()
    return root, cifar_ablation.resolve_setting(epochs, None, num_samples=n_train)


def run_job(args: argparse.Namespace, t0: float) -> int:
    """Everything but --report: state in, sweep, CSV, summary, state out."""
    if args.dry_run:
        shutil.rmtree(args.runs_dir.parent, ignore_errors=True)
    root, sched = prepare(args)
    info = machine_info()
    device_name = info["gpu"] if args.device.startswith("cuda") else f"cpu: {info['cpu']}"
    compute = sched["planned_compute"]
    print(
        f"{info}\nschedule {json.dumps({k: v for k, v in sched.items() if k != 'subset_sizes'})}; "
        f"F = {compute:.4f}; data {root}; runs {args.runs_dir}; csv {args.csv}",
        flush=True,
    )

    def flags_for(net, row, seed):
        return trainer_flags(
            network=net,
            row=row,
            seed=seed,
            data_root=root,
            compute=compute,
            device=args.device,
            schedule=sched if args.dry_run else None,
        )

    lock = _lock(args.runs_dir)
    done = {(r["network"], r["row"], r["seed"]) for r in read_csv(args.csv)}
    if args.state_in:
        restored = unpack_state(Path(args.state_in), args.runs_dir, done)
        print(f"state in: {len(restored)} runs from {args.state_in}: {', '.join(restored) or '-'}", flush=True)
    runs = plan_runs(
        networks=args.networks, rows=args.rows, seeds=args.seeds, runs_dir=args.runs_dir, flags_for=flags_for
    )
    runs = [r for r in runs if r.key not in done]  # in the CSV: finished in an earlier job, never run again
    check_resumable(runs)
    print(
        f"{len(done)} runs already in the CSV; {len(runs)} to go, {args.jobs} at a time, {args.threads} threads "
        f"each; budget {args.budget_s:.0f} s",
        flush=True,
    )
    sweep = Sweep(
        runs,
        csv_path=args.csv,
        device=device_name,
        deadline=t0 + args.budget_s,
        jobs=args.jobs,
        threads=args.threads,
        t0=t0,
        together=args.mode == "together",
    )
    previous = signal.signal(signal.SIGTERM, lambda *_: sweep.stop.set())
    s0 = time.monotonic()
    try:
        sweep.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = job_summary(runs, sweep_s=time.monotonic() - s0)
    return finish_job(args, summary, info, device_name, sched, t0, lock)


def finish_job(args, summary: dict, info: dict, device_name: str, sched: dict, t0: float, lock) -> int:
    """Writes paper_tables.json, the CSV copy and the state tars to --state-out; prints the tables."""
    records = read_csv(args.csv)
    total_s = time.monotonic() - t0
    lines = summary_lines(summary, device=device_name, total_s=total_s)
    result = {
        "machine": info,
        "device": device_name,
        "schedule": {k: v for k, v in sched.items() if k != "subset_sizes"},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "csv": str(args.csv),
        "csv_rows": len(records),
        "total_s": round(total_s, 1),
        "aggregate_img_per_s_total": round(summary["samples_job"] / max(total_s, 1e-9), 1),
        **summary,
        "summary": lines,
    }
    error = None
    if args.state_out:
        out = Path(args.state_out)
        out.mkdir(parents=True, exist_ok=True)
        done = {(r["network"], r["row"], r["seed"]) for r in records}
        folders = unfinished_runs(args.runs_dir, done)
        result["state_runs"] = {
            str(f.relative_to(args.runs_dir)): checkpoint_epoch(f / "last.pth.tar") for f in folders
        }
        try:
            tars = pack_state(folders, args.runs_dir, out)
            result["state_tars"] = {t.name: t.stat().st_size for t in tars}
        except BenchmarkError as e:
            error = result["state_error"] = str(e)
        if args.csv.is_file():
            shutil.copyfile(args.csv, out / args.csv.name)
        (out / "paper_tables.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        packed = ", ".join(f"{name}@{epoch}" for name, epoch in result["state_runs"].items())
        if sum(result.get("state_tars", {}).values()) > STATE_TRAVEL_WARN:
            packed += "; WARNING: over 60 MiB, too much to carry into one device call: split the next job (--networks)"
        lines.append(
            f"state out: {len(result.get('state_tars', {}))} tars, "
            f"{sum(result.get('state_tars', {}).values()) / 2**20:.1f} MiB, in {out}: {packed or 'nothing unfinished'}"
        )
    lock.close()
    print("\n".join(report_lines(records, args.csv, DRY_SETTING if args.dry_run else FULL_SETTING)))
    print("\n" + "\n".join(lines), flush=True)
    failed = [r for r in summary["runs"] if r["status"] == "failed"]
    if error or failed:
        raise BenchmarkError(error or f"{len(failed)} run(s) failed; see their trainer.log (listed above)")
    return 0


def main(argv=None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    try:
        if args.report:
            if not args.csv.is_file():
                raise BenchmarkError(f"no results CSV at {args.csv}; run the sweep first or pass --csv")
            setting = DRY_SETTING if args.dry_run else FULL_SETTING
            print("\n".join(report_lines(read_csv(args.csv), args.csv, setting)))
            return 0
        _validate(args)
        return run_job(args, t0)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
