"""The dataset cache: which extracted archives are kept, which are in use, and removing the unused ones.

Archives passed as ``--data-dir`` (and the embedded CIFAR-10 sample) are extracted once into
``$XDG_CACHE_HOME/dap-pretrain/datasets/<entry>/`` (:func:`dap_pretrain.data.dataset.resolve_data_dir`), where
``<entry>`` is ``<name>-<bytes>-<16 hex digits>`` (the embedded sample's split: the same plus ``-split800``).
Nothing removed them: a changed archive gets a new entry and the old one stays.

Who calls what:
- every process that reads an entry calls :func:`hold` before it looks for it: a shared ``fcntl.flock`` on
  ``.<entry>.use`` beside it, kept until the process ends (the OS drops it at exit, kill -9 included); the file's
  mtime, set then and again at a clean exit, is when the entry was last used. The cache's root gets a
  ``CACHEDIR.TAG`` (the standard marker backup tools honour), which ``--clean`` requires of a ``--cache-dir``;
- ``python -m dap_pretrain cache`` lists the entries (:func:`entries`), and with ``--clean`` removes those unused
  for ``--older-than`` days (:func:`clean`). Only folders named like entries are touched. One cleaner at a time
  (a lock on the cache folder itself); an entry is removed only under an exclusive lock on its current ``.use``
  file, which no holder lets through, and it is first renamed aside, so no reader ever sees half of it. The
  embedded sample's extraction and its split (hard links into it) are kept or removed together. The temporary
  folder of an extraction a killed process left is removed once nobody holds its entry.

Where locks cannot be taken (a file system without ``flock``, a ``.use`` file of another user that cannot be
created), readers read without the mark, and ``--clean`` treats an entry it cannot lock as in use. Locks on a
network file system may be local to each node (NFS ``local_lock``): clean such a cache from a node that runs the
jobs, or not while jobs run.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

_logger = logging.getLogger(__name__)

# <name>-<bytes>-<16 hex> (content keys), or <name>-<bytes>-<mtime> (the keys before them), each maybe -split<N>
ENTRY_NAME = re.compile(r"[^./][^/]*-\d+-([0-9a-f]{16}|\d{9,11})(-split\d+)?")
UNFINISHED = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp")  # tempfile.mkdtemp(prefix=".<entry>.", suffix=".tmp")
TAG = "CACHEDIR.TAG"
_TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This folder holds dap-pretrain's extracted datasets; `python -m dap_pretrain cache` lists and cleans it.\n"
)
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF)
_NO_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS)  # another user's cache, or a read-only mount
_HELD: dict[str, object] = {}  # entry path -> the open .use file whose shared lock this process holds


def root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$XDG_CACHE_HOME/dap-pretrain/datasets`` (``~/.cache/...``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dap-pretrain" / "datasets"


def use_file(entry: Path) -> Path:
    return entry.parent / f".{entry.name}.use"


def _tag(folder: Path) -> None:
    if not (folder / TAG).exists():
        try:
            (folder / TAG).write_text(_TAG_TEXT)
        except OSError:
            pass  # a read-only cache: the marker is for --clean only


def _open_use(path: Path):
    """The ``.use`` file opened for locking: for appending (created if missing), else read-only (another user's
    cache, a read-only mount)."""
    try:
        return open(path, "a")  # noqa: SIM115 - held open for the process's lifetime
    except OSError as e:
        if e.errno not in _NO_WRITE:
            raise
        return open(path)  # noqa: SIM115 - a shared lock needs no write access


def hold(entry: Path) -> bool:
    """Mark ``entry`` in use by this process until it ends, and record now as its last use. Returns whether it is
    marked (False where the file system has no locks or the mark cannot be created; the entry is read anyway).

    Waits while a cleaner holds the entry (it then removes it: the caller finds it gone and extracts again).
    """
    key = str(entry)
    if key in _HELD:
        return True
    _tag(entry.parent)
    path = use_file(entry)
    while True:
        try:
            f = _open_use(path)
        except OSError as e:
            _logger.warning(
                "cannot mark %s in use (%s); reading it anyway, but `python -m dap_pretrain cache --clean` run "
                "elsewhere could remove it meanwhile", entry, e.strerror or e,
            )  # fmt: skip
            return False
        try:
            fcntl.flock(f, fcntl.LOCK_SH)
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # a cleaner removed it after we opened it
            same = False
        except OSError as e:  # no locks here (or a stale NFS handle): read unmarked, but record the use
            f.close()
            _logger.debug("cannot lock %s (%s); reading it unmarked", path, e)
            _touch(path)
            return False
        if same:
            break
        f.close()  # locked a file a cleaner has since unlinked: lock the current one
    _touch(path)
    _HELD[key] = f
    return True


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass  # another user's .use file: its mtime stays theirs


@atexit.register
def _touch_held() -> None:
    """At a clean exit, the entries this process held were last used now (a 60-day run's, too)."""
    for key in _HELD:
        _touch(use_file(Path(key)))


def release_unbuilt(entry: Path) -> None:
    """After building ``entry`` failed (a corrupt archive): stop holding it and, unless another process holds it
    too (its own extraction may still succeed), remove its ``.use`` file, so a failed run leaves the cache as it was.
    Never raises: the caller is already handling the failure."""
    held = _HELD.pop(str(entry), None)
    if held is not None:
        held.close()
    path = use_file(entry)
    try:
        with open(path, "a") as f:  # write access: an exclusive lock on NFS needs it
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not entry.exists() and os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                path.unlink()
    except OSError:
        pass  # held by another process, gone already, or no locks here: leave it


@dataclass(frozen=True)
class Entry:
    path: Path
    bytes: int  # on disk; the embedded split's hard links into its extraction are counted with the extraction
    last_used: float  # Unix time: the .use file's mtime, else the folder's (entries from before the .use files)
    in_use: bool  # another process holds it now (or its lock cannot be tested)


def _size(path: Path, seen: set) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _in_use(entry: Path) -> bool:
    if str(entry) in _HELD:
        return True
    path = use_file(entry)
    try:
        f = open(path, "r+")  # noqa: SIM115 - no O_CREAT: an entry without one is not held
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot test it (another user's file): assume it is
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
    return False


def group_of(name: str) -> str:
    """The embedded sample's split shares its extraction's files: both are one group, kept or removed together."""
    return re.sub(r"-split\d+$", "", name)


def entries(cache_root: Path, *, sizes: bool = True) -> list[Entry]:
    """The cache's entries under ``cache_root`` (folders named like entries only), least recently used first."""
    if not cache_root.is_dir():
        return []
    out, seen = [], set()
    for p in sorted(cache_root.iterdir(), key=lambda p: (group_of(p.name), p.name)):  # an extraction before its split
        if not ENTRY_NAME.fullmatch(p.name) or p.is_symlink() or not p.is_dir():
            continue
        use = use_file(p)
        try:
            last = (use if use.exists() else p).stat().st_mtime
        except OSError:
            continue
        out.append(Entry(path=p, bytes=_size(p, seen) if sizes else 0, last_used=last, in_use=_in_use(p)))
    return sorted(out, key=lambda e: e.last_used)


class CleanRefused(RuntimeError):
    """``clean`` cannot run here (another cleaner, no locks); the message is one line naming the fix."""


def clean(cache_root: Path, *, older_than_days: float, now: float | None = None) -> tuple[list[Entry], list[Entry]]:
    """Remove the entries under ``cache_root`` last used more than ``older_than_days`` ago and not in use, and the
    folders a killed cleaner left renamed aside. Returns ``(removed, kept because in use)``.

    Raises:
        CleanRefused: another cleaner runs on ``cache_root``, or it has no file locks.
    """
    now = time.time() if now is None else now
    try:
        guard = os.open(cache_root, os.O_RDONLY)  # the folder itself: nothing to create on a full disk
    except OSError as e:
        raise CleanRefused(f"cannot open {cache_root} ({e.strerror}); pass a readable cache folder") from None
    try:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CleanRefused(f"another `cache --clean` is running on {cache_root}; wait for it") from None
        except OSError as e:
            raise CleanRefused(f"cannot lock {cache_root} ({e.strerror}); --clean needs file locks there") from None
        found = entries(cache_root)
        stale = {e.path.name for e in found if now - e.last_used >= older_than_days * 86400 and not e.in_use}
        groups_kept = {group_of(e.path.name) for e in found if e.path.name not in stale}
        removed, busy = [], [e for e in found if e.in_use]
        for e in found:
            if e.path.name not in stale:
                continue
            if group_of(e.path.name) in groups_kept:  # its split (or extraction) stays: removing it frees nothing
                continue
            if _remove(e, cache_root, older_than_days=older_than_days, now=now):
                removed.append(e)
            else:
                busy.append(e)
        for p in cache_root.iterdir():
            _remove_leftover(p)
    finally:
        os.close(guard)
    return removed, busy


def _remove_leftover(p: Path) -> None:
    """Folders left by killed processes: an entry a cleaner had renamed aside (no reader can reach it), and an
    extraction's temporary folder whose entry nobody holds (every extractor holds its entry while it extracts)."""
    if not p.name.startswith(".") or p.is_symlink() or not p.is_dir():
        return
    aside = re.fullmatch(r"\.(.+)\.removing-[0-9a-f]{8}", p.name)
    if aside and ENTRY_NAME.fullmatch(aside.group(1)):
        shutil.rmtree(p, ignore_errors=True)
        return
    unfinished = UNFINISHED.fullmatch(p.name)
    if not unfinished or not ENTRY_NAME.fullmatch(unfinished.group(1)):
        return
    path = use_file(p.parent / unfinished.group(1))
    try:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its extractor runs
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                shutil.rmtree(p, ignore_errors=True)
    except OSError:
        pass


def _remove(e: Entry, cache_root: Path, *, older_than_days: float, now: float) -> bool:
    """Remove one stale entry under an exclusive lock on its current ``.use`` file; False if it is in use now."""
    path = use_file(e.path)
    try:  # created here: an entry from before the .use files, whose folder's mtime counts (the listing's)
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), "r+")
        existed = False
    except FileExistsError:
        existed = True
        try:
            f = open(path, "a")  # noqa: SIM115
        except OSError:
            return False
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino or not e.path.is_dir():
                return False  # replaced since the listing (another cleaner, then a new reader): not ours to judge
            if existed and now - os.fstat(f.fileno()).st_mtime < older_than_days * 86400:
                return False  # used again since the listing
            aside = cache_root / f".{e.path.name}.removing-{secrets.token_hex(4)}"
            os.replace(e.path, aside)  # from here no reader can open it; then delete at leisure
            path.unlink()
        except OSError:
            return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
