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


class _LogFile(logging.FileHandler):
    """OUTPUT/log.txt. A write that fails (disk full, folder gone) is reported once, in one line on stderr, and the
    file is then closed and left alone: the run goes on logging to stdout. Python's own handler prints a traceback
    block for every record instead. A checkpoint write that fails the same way still stops the run, in one line."""

    failed = False

    def _give_up(self) -> None:
        """Called while handling the write's exception."""
        if self.failed:
            return
        self.failed = True
        err = sys.exc_info()[1]
        print(
            f"warning: cannot write {self.baseFilename} ({type(err).__name__}: {err}); this run's log goes on to "
            "stdout only. Free some space; the next checkpoint write needs it too",
            file=sys.stderr,
            flush=True,
        )
        stream, self.stream = self.stream, None
        try:
            stream.close()  # what it still buffers cannot be written either
        except OSError:
            pass

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self._give_up()

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:  # else FileHandler.emit would open the file again
            super().emit(record)

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            self._give_up()


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
        handlers.append(_LogFile(output / "log.txt"))
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
