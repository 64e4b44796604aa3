"""The run folder: who owns it (a lock), whether it may be written (another run's files), and provenance.

:func:`claim_output` runs before anything is built; :func:`take_over` once every check of the run has passed;
:func:`release_unused` when a run stops before writing anything.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from dap_pretrain.checkpoint import LAST_CHECKPOINT, remove_stale_tmp
from dap_pretrain.errors import UsageError

RUN_MARKERS = ("run.json", "args.yaml", LAST_CHECKPOINT, "summary.csv")
REPLACED = ".replaced"  # --overwrite: the previous run's files, until the new run's first checkpoint
# What a run writes into OUTPUT (besides export/ and the .lock file); --overwrite removes them.
RUN_FILES = (
    "model_best.pth.tar",
    "log.txt",
    "summary.csv",
    "run.json",
    "args.yaml",
    LAST_CHECKPOINT,
    "dap_schedule.png",
)


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout this package runs from; ``DAP_GIT_COMMIT`` where the copy has no .git (GPU jobs)."""
    if os.environ.get("DAP_GIT_COMMIT"):
        return os.environ["DAP_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def inside_class_folders(run_dir: str | os.PathLike, folders) -> Path | None:
    """The first of ``folders`` (a split folder whose subfolders a dataset reads as classes) that ``run_dir`` lies
    in or is, else ``None``: a run's folder there becomes a class of the next run that reads the data (an empty
    one shifts every later label; the trainer's plots are images). Shared by the trainer and ``pretrain_mm``."""
    run = Path(os.path.abspath(run_dir)).resolve()
    for folder in folders:
        if folder and Path(folder).is_dir() and run.is_relative_to(Path(folder).resolve()):
            return Path(folder)
    return None


def killed_overwrite(folder: Path, what: str) -> str:
    """The refusal for a folder holding ``.replaced/``: an ``--overwrite`` killed (kill -9, out of memory) before
    the new run's first checkpoint, which nothing could undo; the run it replaced is there, not lost."""
    return (
        f"{what} {folder} holds an --overwrite that was killed before its first checkpoint; the run it was replacing "
        f"is kept in {folder / REPLACED}/: pass --overwrite to start the new run again (the kept run is deleted only "
        "once it saves a checkpoint), or move the kept files back to keep the old run"
    )


def check_output_dir(output: Path, *, resume: str, overwrite: bool) -> None:
    """Refuse to write into a folder that holds another run, unless resuming it or told to overwrite.

    ``--resume A/last.pth.tar`` continues run A: ``--output`` must be A's folder or hold no run (or ``--overwrite``
    replaces the run there); ``--overwrite`` together with resuming the folder's own run is refused, since it would
    delete the run being continued. A folder holding a run without a command is refused with the fix that works:
    ``--resume OUTPUT/last.pth.tar`` where that checkpoint exists, else (a run that failed or was stopped before its
    first checkpoint) ``--overwrite`` or another ``--output``.
    """
    held = [m for m in RUN_MARKERS if (output / m).exists()]
    own = bool(resume) and output.exists() and Path(resume).resolve().parent == output.resolve()
    if own and overwrite:
        raise UsageError(
            f"--overwrite would delete the run in {output} that --resume {resume} continues; drop --overwrite"
        )
    if held and resume and not own and not overwrite:
        raise UsageError(
            f"output folder {output} holds another run ({', '.join(held)}) than --resume {resume}; pass --output "
            f"{Path(resume).parent} to continue that run there, an empty folder, or --overwrite to replace {output}"
        )
    if held and not resume and not overwrite:
        if (output / LAST_CHECKPOINT).is_file():
            raise UsageError(
                f"output folder {output} already holds a run ({', '.join(held)}); pass --resume "
                f"{output / LAST_CHECKPOINT} to continue it, --overwrite to replace it, or another --output"
            )
        if (output / REPLACED).is_dir():
            raise UsageError(killed_overwrite(output, "output folder"))
        raise UsageError(
            f"output folder {output} holds an earlier run ({', '.join(held)}) but no {LAST_CHECKPOINT} to resume it "
            "from (it failed or was stopped before saving one); pass --overwrite to start it again there, or another "
            "--output"
        )


def claim_output(output: Path, *, resume: str, overwrite: bool):
    """Own OUTPUT: an advisory ``fcntl.flock`` on OUTPUT/.lock (the OS drops it when the process dies, so a
    kill -9 leaves no stale lock), then the folder checks.

    Returns the open lock file; closing it releases the folder. A folder owned by another live trainer, or one
    holding another run, raises :class:`UsageError` with nothing in it changed. :func:`take_over` writes the
    owner's name into the lock file once every check of the run has passed.

    A start that stops before writing anything removes the lock file it made (:func:`release_unused`). So a lock
    taken on a file that was unlinked between this call's open and its flock is not kept: the claim starts again
    on the file now at that path, else two starts could each hold a lock on a different file.
    """
    return locked_while_linked(lambda: _claim_once(output, resume=resume, overwrite=overwrite), output / ".lock")


def locked_while_linked(take, path: Path, *, tries: int = 3):
    """``take()`` (opens and flocks the lock file at ``path``, returns it open) until the file it locked is still
    the one at ``path``: a start that stops removes the lock file it made, and a lock taken on it between this
    start's open and its flock guards nothing (a third start could lock the new file). The last try is kept."""
    for _ in range(tries - 1):
        lock = take()
        try:
            if os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino:
                return lock
        except FileNotFoundError:
            pass
        lock.close()  # nothing was written under it
    return take()


def _claim_once(output: Path, *, resume: str, overwrite: bool):
    """One try of :func:`claim_output`."""
    try:
        created = [p for p in (output, *output.parents) if not p.exists()]
        new_lock = not (output / ".lock").exists()
        output.mkdir(parents=True, exist_ok=True)
        fd = os.open(output / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"cannot use {output} as the run folder ({e.strerror}); pass another --output") from None
    lock = os.fdopen(fd, "r+")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = lock.read().strip() or "one still starting"
            raise UsageError(
                f"output folder {output} is in use by another trainer ({other}); "
                "wait for it to finish or pass another --output"
            ) from None
        lock.created = created  # folders this call made: removed again if the run stops before writing anything
        lock.new_lock = new_lock  # and the lock file, if this call made it
        check_output_dir(output, resume=resume, overwrite=overwrite)
    except BaseException:
        release_unused(lock, output)  # what this call made (nothing when the folder is another trainer's)
        lock.close()
        raise
    return lock


def release_unused(lock, output: Path) -> None:
    """After a run that stopped before writing anything: remove the lock file and the folders it created, so a
    refused command leaves no trace (a folder holding anything else is kept, and a lock file it held before)."""
    if getattr(lock, "taken", False):  # take_over ran: the run may have written files, and the lock stays with them
        return
    if getattr(lock, "new_lock", False):
        (output / ".lock").unlink(missing_ok=True)
    created = getattr(lock, "created", [])
    if not created or any(output.iterdir()):
        return
    for folder in created:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


def take_over(lock, output: Path, *, overwrite: bool) -> list[str]:
    """Once every check has passed: name this trainer in the lock file, remove the temp files of killed writes
    and, with ``--overwrite``, set the previous run's files aside (:func:`clear_run`; ``lock.replaced`` is then
    true). Returns what it removed or set aside."""
    lock.taken = True
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    removed = remove_stale_tmp(output)
    if overwrite:
        removed += clear_run(output)
        lock.replaced = True
    return removed


def clear_run(output: Path) -> list[str]:
    """``--overwrite``: set the previous run's files (:data:`RUN_FILES`, ``export/``) aside with :func:`set_aside`
    (called once every check has passed). Returns the names set aside (or deleted)."""
    names = [n for n in RUN_FILES if (output / n).is_file()] + (["export"] if (output / "export").is_dir() else [])
    set_aside(output, names)
    return [f"{n}/" if n == "export" else n for n in names]


def set_aside(output: Path, names: list[str]) -> None:
    """Move the previous run's entries ``names`` into ``OUTPUT/.replaced/``. They stay there until the new run has
    saved its first checkpoint (:func:`drop_replaced`), and come back if it stops before that
    (:func:`restore_replaced`), so a run that fails early loses nothing. A ``.replaced/`` left by an attempt killed
    before its first checkpoint still holds the run being replaced: that attempt's own entries are deleted instead."""
    kept = output / REPLACED
    earlier = kept.is_dir()
    kept.mkdir(exist_ok=True)
    for name in names:
        path = output / name
        if not earlier:
            os.replace(path, kept / name)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def drop_replaced(output: Path) -> None:
    """The new run has saved its own checkpoint: delete the previous run's entries set aside by :func:`set_aside`."""
    shutil.rmtree(output / REPLACED, ignore_errors=True)


def restore_replaced(output: Path, current: list[str] = (*RUN_FILES, "export")) -> list[str]:
    """The new run stopped before its first checkpoint: delete its entries ``current`` and put the previous run's
    back from ``OUTPUT/.replaced/``. Returns the names restored."""
    kept = output / REPLACED
    if not kept.is_dir():
        return []
    for name in current:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    names = sorted(p.name for p in kept.iterdir())
    for name in names:
        os.replace(kept / name, output / name)
    kept.rmdir()
    return names
