"""Expected failures and the one way entry points report them.

An expected failure (bad flags, bad data, a run folder in use, a full disk) is a :class:`DapError` whose message is
one line naming the problem and the fix. Every entry point is wrapped by :func:`entry_point`, which prints that
line and exits 2; any other exception keeps its traceback, since it is a bug or a fault we did not foresee.
Library code raises plain ``ValueError`` for invalid arguments, as timm and torch do; :func:`user_input` turns
those into :class:`UsageError` where the values came from the user.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets per process


class DapError(Exception):
    """An expected failure; its message is one line naming the problem and the fix (exit code 2)."""


class UsageError(DapError, ValueError):
    """Bad input found by an entry point; printed as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's time limit, ``kill``) in one process outside torchrun: the run stops as Ctrl-C
    stops it (its locks released, an ``--overwrite``'s previous run put back, the line naming ``--resume``), with
    the shell's code for SIGTERM, 143. Python's default was to die at once, without a word."""


def stopped(e: KeyboardInterrupt, text: str) -> KeyboardInterrupt:
    """The same kind of stop as ``e`` (Ctrl-C or SIGTERM), saying ``<how>; <text>``."""
    return type(e)(f"{'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'}; {text}")


@contextmanager
def _sigterm_stops():
    """Inside: SIGTERM raises :class:`Terminated`, in the main thread of a process not started by torchrun
    (torchrun stops its processes with SIGTERM when one fails; they keep its default). The handler before is put
    back after."""
    if "TORCHELASTIC_RUN_ID" in os.environ or threading.current_thread() is not threading.main_thread():
        yield
        return

    chld = []  # torch's SIGCHLD handler, set aside once SIGTERM came (torch installs it once per process)

    def stop(signum, frame):
        # A scheduler signals the loader workers too; torch's SIGCHLD handler would then add a traceback of their
        # deaths to the one line. The run is stopping: it no longer needs to hear of them.
        chld.append(signal.signal(signal.SIGCHLD, signal.SIG_DFL))
        raise Terminated

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
        if chld:
            signal.signal(signal.SIGCHLD, chld[0])


def one_line(text: object) -> str:
    """``text`` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


@contextmanager
def user_input():
    """Inside: a ``ValueError`` raised by validating user-given values becomes a :class:`UsageError`."""
    try:
        yield
    except DapError:
        raise
    except ValueError as e:
        raise UsageError(one_line(e)) from e


def print_error(line: str) -> None:
    """Print ``line`` and its newline to stderr in one write, then flush.

    ``print`` writes the text and the newline separately; two DDP ranks failing together then interleave into
    ``error: ...error: ...`` on one line. One write below ``PIPE_BUF`` (4 KiB) reaches a pipe whole.
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def close_process_group() -> None:
    """Destroy the default process group, if a run under torchrun made one (torch's own advice for every exit).

    Left to the interpreter's exit, gloo's worker threads are torn down during finalisation and the process can
    abort (``terminate called without an active exception``, SIGABRT) after a run that succeeded: torchrun then
    reports the job failed. :func:`entry_point` calls it after its main returns or refuses in one line, where this
    process has no collective in flight; never after Ctrl-C or a traceback, which may stop one mid-way. torch is not
    imported for it.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (the process is ending; its result is already said)
            pass


def on_every_rank(error: DapError) -> DapError:
    """Mark ``error`` as one every process of a torchrun job raises alike (rank 0's refusal that the others share,
    a check of the config): :func:`entry_point` prints it once per node, from local rank 0, not once per process.
    Unmarked errors, which may come from one process alone, are printed by each process that raises them."""
    error.every_rank = True
    return error


@contextmanager
def refused_on_every_rank():
    """Inside: every :class:`DapError` is marked :func:`on_every_rank` (checks of inputs every process reads
    alike: the config, data root, checkpoint, work dir)."""
    try:
        yield
    except DapError as e:
        on_every_rank(e)
        raise


PEER_WAIT_S = 20.0  # how long a process that leaves a shared refusal to local rank 0 waits for torchrun to stop it


def _print_refusal(line: str, error: DapError) -> None:
    """Print ``line`` now, unless ``error`` is marked :func:`on_every_rank` and this is a torchrun process other
    than its node's local rank 0. That one waits instead: local rank 0 prints the line and exits, and torchrun then
    stops the others. Exiting first would let torchrun stop local rank 0 before it printed (the processes are not
    in step when they check their inputs), so that nothing is said; after ``PEER_WAIT_S`` it prints the line too.
    """
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if getattr(error, "every_rank", False) and under_torchrun and os.environ.get("LOCAL_RANK", "0") != "0":
        time.sleep(PEER_WAIT_S)
    print_error(line)


def entry_point(main=None, *, prog: str = "", exit: bool = True):  # noqa: A002  (exit: like sys.exit)
    """Wrap an entry point: a :class:`DapError` becomes ``[prog: ]error: <line>`` on stderr and exit code 2
    (under torchrun, one marked :func:`on_every_rank` is printed once per node).

    ``exit=True`` raises ``SystemExit(2)``; ``exit=False`` returns 2, for mains run as ``sys.exit(main())``.
    Ctrl-C (``KeyboardInterrupt``) is one line too, with the shell's code for it, 130; so is SIGTERM outside
    torchrun (:class:`Terminated`), with 143.
    Any other exception passes through with its traceback. Use as ``@entry_point`` or
    ``@entry_point(prog="report", exit=False)``.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(argv=None):
            try:
                with _sigterm_stops():
                    result = fn(argv)
            except DapError as e:
                _print_refusal(f"{prog + ': ' if prog else ''}error: {one_line(e) or type(e).__name__}", e)
                close_process_group()
                if exit:
                    sys.exit(2)
                return 2
            except KeyboardInterrupt as e:  # Ctrl-C: one line, not Python's traceback of wherever the run was
                said = one_line(e) or one_line(stopped(e, "what was saved before it is kept"))  # a run: its --resume
                if os.environ.get("RANK", "0") == "0":  # under torchrun every process gets it; rank 0 says it once
                    print_error(f"{prog + ': ' if prog else ''}{said}")
                code = 143 if isinstance(e, Terminated) else 130
                if exit:
                    sys.exit(code)
                return code
            close_process_group()
            return result

        return wrapper

    return wrap(main) if main is not None else wrap


def brief(error: BaseException, limit: int = 120) -> str:
    """The first line of an exception's text without terminal escape codes, cut at a word to about ``limit``: a
    library's message inside one of ours (torch's load errors run to many lines, some with colour codes)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(error)).strip()
    first = text.splitlines()[0].strip() if text else type(error).__name__
    return first if len(first) <= limit else first[:limit].rsplit(" ", 1)[0] + " ..."


def cause(error: BaseException, limit: int = 120) -> str:
    """A library's exception inside one of our lines: its type, and its :func:`brief` text where it has one."""
    text = brief(error, limit)
    return text if text == type(error).__name__ else f"{type(error).__name__}: {text}"
