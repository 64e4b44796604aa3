"""``python -m dap_pretrain.multirun``: several training runs in one process, each in a thread on its own CUDA stream.

Why: a CIFAR-sized network leaves most of an H100 idle, and separate processes cannot fill it, since the GPU
time-slices between processes (no two CUDA contexts run kernels at once without MPS). Threads of one process
launching on separate streams can overlap their kernels. Each run is an ordinary trainer run (the same argv as
``python -m dap_pretrain.train``, its own output folder, sampler, schedule, recorder, model and optimizer);
what the runs share is the process: one decoded copy of the data on the CPU (see
:func:`dap_pretrain.data.memory.decode_dataset`), the CUDA context, and a lock around seeding + model init so
each run starts from the same weights it would get alone.

    python -m dap_pretrain.multirun --run "--config A.yaml --output runs/a" --run "--config B.yaml --output runs/b"

Exit code: 0 when every run finished, 2 when any failed with a one-line error (printed per run), 1 for a bug
(its traceback is printed). A run that fails does not stop the others.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
import traceback
from contextlib import nullcontext

import torch

from dap_pretrain.errors import print_error
from dap_pretrain.train import main as train_main


def _stream_context(device_hint: str):
    if torch.cuda.is_available() and device_hint != "cpu":
        return torch.cuda.stream(torch.cuda.Stream())
    return nullcontext()


def run_many(argvs: list[list[str]]) -> list[dict | BaseException | None]:
    """Train every argv in its own thread (and CUDA stream); returns each run's summary or its exception."""
    results: list = [None] * len(argvs)

    def one(i: int, argv: list[str]) -> None:
        device = argv[argv.index("--device") + 1] if "--device" in argv[:-1] else "auto"
        try:
            with _stream_context(device):
                results[i] = train_main(argv)
        except BaseException as e:  # reported per run by the caller; the other runs go on
            results[i] = e
            if not isinstance(e, (ValueError, FileNotFoundError)):
                traceback.print_exc()

    threads = [threading.Thread(target=one, args=(i, a), name=f"run{i}") for i, a in enumerate(argvs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


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
    args = p.parse_args(argv)
    argvs = [shlex.split(r) for r in args.run]
    outputs = [a[a.index("--output") + 1] if "--output" in a[:-1] else None for a in argvs]
    if None in outputs or len(set(outputs)) != len(outputs):
        print_error("error: every --run needs its own --output folder; give each run a different one")
        return 2
    code = 0
    for out, result in zip(outputs, run_many(argvs), strict=True):
        if isinstance(result, (ValueError, FileNotFoundError)):
            lines = str(result).strip().splitlines() or [type(result).__name__]
            print_error(f"error: {out}: {lines[0]}")
            code = code or 2
        elif isinstance(result, BaseException):
            print_error(f"error: {out}: {type(result).__name__} (traceback above)")
            code = 1  # a bug outranks bad input
    return code


if __name__ == "__main__":
    sys.exit(main())
