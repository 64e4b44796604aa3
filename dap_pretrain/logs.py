"""Per-thread logging of a run: held until the run folder is ready, then to stdout and OUTPUT/log.txt."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path


class _ThisThread(logging.Filter):
    """Passes the records of the thread that made it: each run of ``dap_pretrain.multirun`` logs to its own file."""

    def __init__(self):
        super().__init__()
        self.ident = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.ident


def main_process_logging(rank: int, output: Path) -> None:
    """Log this thread's records to stdout and (rank 0) OUTPUT/log.txt, replacing its earlier run's handlers.

    Handlers are per thread, so runs sharing a process (``dap_pretrain.multirun``) keep separate logs; handlers
    that no run added (e.g. an earlier ``basicConfig``) are replaced too, as ``basicConfig(force=True)`` would.
    """
    root = logging.getLogger()
    ident = threading.get_ident()
    for handler in list(root.handlers):
        if getattr(handler, "dap_thread", None) in (ident, None):
            root.removeHandler(handler)
            handler.close()
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(output / "log.txt"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(_ThisThread())
        handler.dap_thread = ident
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class HeldLogs(logging.Handler):
    """Holds this thread's log records until the run folder is ready (checks passed, ``--overwrite`` cleared).

    Attached on creation, replacing this thread's handlers as :func:`main_process_logging` does (so an earlier
    run's log.txt gets none of this run's lines); :meth:`close` detaches it, :meth:`replay` sends the records on.
    """

    def __init__(self, rank: int):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        ident = threading.get_ident()
        self.addFilter(lambda record: record.thread == ident)
        self.dap_thread = ident  # other threads' runs (dap_pretrain.multirun) leave it in place
        root = logging.getLogger()
        for handler in list(root.handlers):
            if getattr(handler, "dap_thread", None) in (ident, None):
                root.removeHandler(handler)
                handler.close()
        root.addHandler(self)
        root.setLevel(logging.INFO if rank == 0 else logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def close(self) -> None:
        logging.getLogger().removeHandler(self)
        super().close()

    def replay(self) -> None:
        root = logging.getLogger()
        for record in self.records:
            root.handle(record)
        self.records = []
