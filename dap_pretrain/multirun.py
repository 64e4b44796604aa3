"""``python -m dap_pretrain.multirun``: several training runs in one process, each in a thread on its own CUDA stream.

Why: a CIFAR-sized network leaves most of an H100 idle, and separate processes cannot fill it, since the GPU
time-slices between processes (no two CUDA contexts run kernels at once without MPS). Threads of one process
launching on separate streams can overlap their kernels. Each run is an ordinary trainer run (the same argv as
``python -m dap_pretrain.train``, its own output folder, sampler, schedule, recorder, model and optimizer);
what the runs share is the process: one decoded copy of the data on the CPU (see
:func:`dap_pretrain.data.memory.decode_dataset`), the CUDA context, and a lock around seeding + model init so
each run starts from the same weights it would get alone. That holds because nothing else in a run draws from
torch's global generator: our loaders carry their own (:func:`dap_pretrain.data.loader.private_generator`) and
augmentation is seeded per sample. A model that draws while it trains (dropout, drop-path) does draw from it (on a
GPU, from the device's): such runs share one stream of random numbers, so they do not repeat what they would do
alone, and on the CPU they can change the initial weights of a run starting beside them.

    python -m dap_pretrain.multirun --run "--config A.yaml --output runs/a" --run "--config B.yaml --output runs/b"

``--jobs N`` keeps at most N runs training at once: the others wait in the order given and each starts the moment
a slot frees, so a queue of runs with unequal lengths (a 100%-compute baseline beside 63% ones, two seeds of six
rows) keeps N runs on the GPU until the queue is empty, instead of ending each group with its slowest run.
``--start-until T`` starts no queued run after the Unix time T (seconds; a caller that stops the process at a
deadline passes that deadline less the time a run needs to be worth starting); runs left then are reported as not
started. ``--status FILE`` keeps a JSON file up to date as runs start and end: per ``--output``, its state
(``queued``, ``running``, ``finished``, ``failed``, ``not started``), the ``time.time()`` of its start and end, and a
failed run's one-line error, so a caller that had to kill the process still knows which runs ran, for how long, and
why one failed.

Exit code: 0 when every run finished (or was not started because of ``--start-until``), 2 when any failed with a
one-line error (printed the moment it fails), 1 for a bug (its traceback is printed). A run that fails does not stop
the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

from dap_pretrain.errors import DapError, one_line, print_error
from dap_pretrain.train import main as train_main

NOT_STARTED = "not started"  # run_many's result for a run that --start-until kept from starting


def _stream_context(device_hint: str):
    if torch.cuda.is_available() and device_hint != "cpu":
        return torch.cuda.stream(torch.cuda.Stream())
    return nullcontext()


class _Status:
    """Each run's state and start/end times, rewritten atomically to ``path`` (if any) on every change."""

    def __init__(self, outputs: list[str], path: str | None):
        self.path = Path(path) if path else None
        self.runs = {out: {"state": "queued", "started": None, "ended": None, "error": None} for out in outputs}
        self.lock = threading.Lock()
        self.set(None)

    def set(self, out: str | None, **fields) -> None:
        with self.lock:
            if out is not None:
                self.runs[out].update(fields)
            if self.path is None:
                return
            tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(self.runs, indent=1) + "\n")
                os.replace(tmp, self.path)
            except OSError as e:  # a full disk must not stop the runs: they save their own checkpoints
                print_error(f"warning: cannot write --status {self.path} ({e.strerror}); no longer updating it")
                with contextlib.suppress(OSError):
                    tmp.unlink()
                self.path = None


def run_many(
    argvs: list[list[str]], *, jobs: int | None = None, start_until: float | None = None, status: str | None = None
) -> list:
    """Train every argv in its own thread and CUDA stream, at most ``jobs`` at once, in the order given.

    Args:
        argvs: one trainer argv each (``python -m dap_pretrain.train``'s flags), each with its own ``--output``.
        jobs: runs training at once; a queued run starts as soon as one ends. ``None``: all at once.
        start_until: a ``time.time()``; a queued run not started by then is not started at all.
        status: a JSON file kept up to date with each run's state and times (see the module docstring).

    Returns:
        Per argv, in order: the run's summary (a dict), the exception it raised, or :data:`NOT_STARTED`.
    """
    outputs = [_output_of(a) or f"run{i}" for i, a in enumerate(argvs)]
    results: list = [NOT_STARTED] * len(argvs)
    board = _Status(outputs, status)
    queue, take = list(range(len(argvs))), threading.Lock()

    def one(i: int) -> None:
        argv = argvs[i]
        device = argv[argv.index("--device") + 1] if "--device" in argv[:-1] else "auto"
        board.set(outputs[i], state="running", started=time.time())
        try:
            with _stream_context(device):
                results[i] = train_main(argv)
            board.set(outputs[i], state="finished", ended=time.time())
        except BaseException as e:  # reported at once, per run; the other runs go on
            results[i] = e
            if isinstance(e, DapError):
                line = one_line(e) or type(e).__name__
            else:
                traceback.print_exc()
                line = f"{type(e).__name__}: {one_line(e)[:200]} (traceback above)"  # e.g. CUDA out of memory
            print_error(f"error: {outputs[i]}: {line}")
            board.set(outputs[i], state="failed", ended=time.time(), error=line)

    def worker() -> None:
        while True:
            with take:
                if not queue:
                    return
                i = queue.pop(0)
                if start_until is not None and time.time() >= start_until:
                    board.set(outputs[i], state=NOT_STARTED)
                    continue
            one(i)

    slots = len(argvs) if jobs is None else max(1, min(jobs, len(argvs)))
    threads = [threading.Thread(target=worker, name=f"slot{k}") for k in range(slots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _output_of(argv: list[str]) -> str | None:
    return argv[argv.index("--output") + 1] if "--output" in argv[:-1] else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="dap-multirun", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="FLAGS",
        help="one trainer command line (quoted); repeat for each run",
    )
    p.add_argument("--jobs", type=int, default=None, help="runs training at once; the rest queue (default: all)")
    p.add_argument("--start-until", type=float, default=None, metavar="T", help="start no queued run after Unix time T")
    p.add_argument("--status", default=None, metavar="FILE", help="JSON file of each run's state and times")
    args = p.parse_args(argv)
    argvs = [shlex.split(r) for r in args.run]
    outputs = [_output_of(a) for a in argvs]
    if None in outputs or len(set(outputs)) != len(outputs):
        print_error("error: every --run needs its own --output folder; give each run a different one")
        return 2
    if args.jobs is not None and args.jobs < 1:
        print_error(f"error: --jobs {args.jobs}: at least one run must train at a time; pass e.g. --jobs 6")
        return 2
    if args.status and not Path(args.status).resolve().parent.is_dir():
        print_error(f"error: --status {args.status}: its folder does not exist; create it or name a file in another")
        return 2
    code = 0
    results = run_many(argvs, jobs=args.jobs, start_until=args.start_until, status=args.status)
    for out, result in zip(outputs, results, strict=True):
        if result is NOT_STARTED:
            print_error(f"note: {out}: not started (--start-until {args.start_until:.0f} had passed)")
        elif isinstance(result, DapError):
            code = code or 2  # its error line was printed when it failed
        elif isinstance(result, BaseException):
            code = 1  # a bug outranks bad input
    return code


if __name__ == "__main__":
    sys.exit(main())
