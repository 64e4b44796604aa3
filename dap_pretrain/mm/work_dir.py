"""The mm work dir: one owner, no other run's files mixed in, and a refused run leaves it as it was.

Who calls what, and when (:func:`~dap_pretrain.mm.runner.pretrain_mm`, on rank 0; file operations only):

1. :func:`check_work_dir` before anything is written (and again under the lock);
2. :meth:`WorkDirSnapshot.take` just before :func:`work_dir_lock` creates the folder and ``.dap.lock``;
3. a refusal (:class:`~dap_pretrain.mm.settings.DaPMMError`) from the built run that saved no checkpoint:
   :meth:`WorkDirSnapshot.restore` removes what the run added (mmengine's timestamp log folder, the lock file, the
   folders it created) and rewrites the files it changed (the config dump) with their old bytes;
4. ``--overwrite``: :class:`ClearPreviousRun` sets the previous run's files (:func:`previous_run_files`) aside in
   ``before_train``, after :class:`~dap_pretrain.mm.hook.DaPHook` has checked the built run, deletes them once the
   new run has saved a checkpoint, and puts them back if it stops before, as the timm trainer's ``--overwrite``.
   Other files in the work dir are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mmengine.hooks import Hook

from dap_pretrain.mm.settings import DaPMMError
from dap_pretrain.run_folder import (
    REPLACED,
    drop_replaced,
    killed_overwrite,
    locked_while_linked,
    restore_replaced,
    set_aside,
)

RUN_MARKERS = ("run.json", "summary.csv", "last_checkpoint")
LOCK = ".dap.lock"
_LOG_FOLDER = re.compile(r"\d{8}_\d{6}")  # mmengine's per-run log folder, WORK_DIR/<timestamp>/
_RUN_FILE = re.compile(r"(epoch|iter|best)_.*\.pth|.*\.tmp")  # checkpoints and interrupted atomic writes
_SNAPSHOT_MAX_BYTES = 1 << 20  # files kept in memory to restore (config dump, run.json, ...); checkpoints are larger


def not_a_folder(work_dir: Path) -> str | None:
    """Why ``--work-dir`` cannot be a folder (it is a file, or below one: mkdir's NotADirectoryError traceback,
    after ``--check`` had said "inputs ok"), or ``None``. Shared with ``downstream.transfer``."""
    if work_dir.exists() and not work_dir.is_dir():
        return f"--work-dir {work_dir} is a file; pass a folder"
    blocking = next((p for p in work_dir.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        return f"--work-dir {work_dir} is under {blocking}, which is a file; pass a folder elsewhere"
    return None


def check_work_dir(work_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a work dir that is a file, or that holds another DaP run unless resuming it or told to overwrite it
    (``--resume`` is offered only when the run saved a checkpoint)."""
    refusal = not_a_folder(work_dir)
    if refusal:
        raise DaPMMError(refusal)
    if (work_dir / REPLACED).is_dir() and not resume and not overwrite:
        raise DaPMMError(killed_overwrite(work_dir, "work dir"))
    held = [m for m in RUN_MARKERS if (work_dir / m).exists()]
    if held and not resume and not overwrite:
        again = "--resume to continue it, " if (work_dir / "last_checkpoint").exists() else ""
        raise DaPMMError(
            f"work dir {work_dir} already holds a run ({', '.join(held)}); pass {again}--overwrite to replace it, "
            "or another --work-dir"
        )


def last_checkpoint_in(work_dir: Path, *, fix: str) -> Path | None:
    """The checkpoint ``WORK_DIR/last_checkpoint`` names (``None`` without that file). mmengine writes it as an
    absolute path, so in a work dir moved or copied since it names the old place: then the work dir's own file of
    that name is returned. If the work dir has none, :class:`DaPMMError` with ``fix``."""
    marker = work_dir / "last_checkpoint"
    if not marker.is_file():
        return None
    named = Path(marker.read_text().strip())
    if named.parent.resolve() == work_dir.resolve() or not named.name:
        return named
    own = work_dir / named.name
    if not own.is_file():
        raise DaPMMError(f"{marker} names {named}, outside this work dir, and the work dir has no {named.name}; {fix}")
    return own


@contextlib.contextmanager
def work_dir_lock(work_dir: Path, *, enabled: bool):
    """An advisory lock on WORK_DIR/.dap.lock (rank 0); the OS drops it when the process dies.

    A refused start's :meth:`WorkDirSnapshot.restore` removes the lock file it made. Should that happen between
    this start's open and its flock, the lock is on a removed file and a third start could take the new one: the
    lock is taken again on the file now at that path (as the trainer's ``claim_output``).
    """
    if not enabled:
        yield
        return
    work_dir.mkdir(parents=True, exist_ok=True)

    def take():
        f = open(work_dir / LOCK, "w")  # noqa: SIM115  (returned open: the with-block below closes it)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise DaPMMError(
                f"work dir {work_dir} is in use by another run; wait for it or pass another --work-dir"
            ) from None
        except BaseException:
            f.close()
            raise
        return f

    with locked_while_linked(take, work_dir / LOCK):
        yield


def previous_run_files(work_dir: Path, *, keep: tuple[str, ...] = (), also: tuple[str, ...] = ()) -> list[Path]:
    """What ``--overwrite`` replaces: the previous run's ``epoch_N.pth``/``best_*.pth``, ``last_checkpoint``,
    ``run.json``, ``summary.csv``, the files named in ``also`` (a transfer's ``metrics.json``), leftover ``*.tmp``
    files and mmengine's timestamp log folders (but ``keep``)."""
    if not work_dir.is_dir():
        return []
    out = []
    for p in sorted(work_dir.iterdir()):
        if p.name in keep:
            continue
        if p.is_file() and (p.name in RUN_MARKERS or p.name in also or _RUN_FILE.fullmatch(p.name)):
            out.append(p)
        elif p.is_dir() and not p.is_symlink() and _LOG_FOLDER.fullmatch(p.name):
            out.append(p)
    return out


class FirstIteration(Hook):
    """Marks that training reached its first iteration. A run that fails before it (a config key the loops,
    loaders or optimizer refuse, with mmengine's traceback) wrote only its config dump and a log folder, and
    :meth:`WorkDirSnapshot.restore` takes those back, as for a refusal."""

    priority = "LOWEST"

    def __init__(self):
        self.reached = False

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self.reached = True


class ClearPreviousRun(Hook):
    """``--overwrite``: in ``before_train``, sets :func:`previous_run_files` aside in ``WORK_DIR/.replaced/``
    (:func:`dap_pretrain.run_folder.set_aside`, as the timm trainer's ``--overwrite``); after the first epoch whose
    checkpoint was saved, deletes them; :meth:`undo` puts them back if the run stops before. Register it with
    priority ``'LOWEST'``, so it runs after :class:`~dap_pretrain.mm.hook.DaPHook` has accepted the built run and
    after mmengine's ``CheckpointHook`` has saved the epoch."""

    def __init__(self, *, work_dir: Path, keep: tuple[str, ...], also: tuple[str, ...] = ()):
        self.work_dir, self.keep, self.also, self.removed, self.pending = Path(work_dir), keep, also, [], False

    def before_train(self, runner) -> None:
        self.removed = [p.name for p in previous_run_files(self.work_dir, keep=self.keep, also=self.also)]
        if self.removed:
            set_aside(self.work_dir, self.removed)
            self.pending = True
            runner.logger.info(
                f"--overwrite: set the previous run's {', '.join(self.removed)} aside in {REPLACED}/ until this run's "
                "first checkpoint"
            )

    def after_train_epoch(self, runner) -> None:
        if self.pending and (self.work_dir / "last_checkpoint").exists():  # this run's own (the old one is aside)
            drop_replaced(self.work_dir)
            self.pending = False

    def undo(self) -> None:
        """The run stopped before its first checkpoint: its files out, the previous run's back."""
        if self.pending:
            current = previous_run_files(self.work_dir, keep=self.keep, also=self.also)
            restore_replaced(self.work_dir, [p.name for p in current])
            self.pending = False


@dataclass
class WorkDirSnapshot:
    """The work dir's top level before a run: which entries existed, and the bytes of its small files."""

    work_dir: Path
    missing: list[Path] = field(default_factory=list)  # the work dir and parents that did not exist, deepest first
    entries: set[str] = field(default_factory=set)
    small: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def take(cls, work_dir: Path) -> WorkDirSnapshot:
        work_dir = Path(work_dir).absolute()
        snap = cls(work_dir, missing=[p for p in (work_dir, *work_dir.parents) if not p.exists()])
        if work_dir.is_dir():
            for p in work_dir.iterdir():
                snap.entries.add(p.name)
                if p.is_file() and not p.is_symlink() and p.stat().st_size <= _SNAPSHOT_MAX_BYTES:
                    snap.small[p.name] = p.read_bytes()
        return snap

    def saved_checkpoint(self) -> bool:
        """Whether the run saved a checkpoint since the snapshot (then its files are its own and are kept)."""
        pointer = self.work_dir / "last_checkpoint"
        if pointer.is_file() and pointer.read_bytes() != self.small.get("last_checkpoint"):
            return True
        return any(p.name not in self.entries for p in self.work_dir.glob("*.pth"))

    def restore(self) -> None:
        """Undo a refused run that saved no checkpoint: remove the entries it added, rewrite the files it changed."""
        if not self.work_dir.is_dir() or self.saved_checkpoint():
            return
        for p in self.work_dir.iterdir():
            if p.name not in self.entries:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            elif p.name in self.small and p.is_file() and p.read_bytes() != self.small[p.name]:
                p.write_bytes(self.small[p.name])
        for folder in self.missing:  # deepest first; stops at one that holds something
            try:
                folder.rmdir()
            except OSError:
                break
