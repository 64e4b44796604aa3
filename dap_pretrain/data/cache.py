"""The dataset cache: which extracted archives are kept, which are in use, and removing the unused ones.

Archives passed as ``--data-dir`` (and the embedded CIFAR-10 sample) are extracted once into
``$XDG_CACHE_HOME/dap-pretrain/datasets/<entry>/`` (:func:`dap_pretrain.data.dataset.resolve_data_dir`). Nothing
removed them: a changed archive gets a new entry and the old one stays.

Who calls what:
- every process that reads an entry calls :func:`hold` once it exists: a shared ``fcntl.flock`` on
  ``.<entry>.use`` beside it, kept until the process ends (the OS drops it at exit, kill -9 included), and the
  file's mtime set to now, which is when the entry was last used;
- ``python -m dap_pretrain cache`` lists the entries (:func:`entries`), and with ``--clean`` removes those unused
  for ``--older-than`` days (:func:`clean`): an entry is removed only under an exclusive lock on its ``.use`` file,
  which no process holding it lets through, and it is first renamed aside, so no reader ever sees half of it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

_HELD: dict[str, object] = {}  # entry path -> the open .use file whose shared lock this process holds
_UNFINISHED_AGE_S = 24 * 3600  # a hidden extraction folder this old was left by a killed process


def root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$XDG_CACHE_HOME/dap-pretrain/datasets`` (``~/.cache/...``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dap-pretrain" / "datasets"


def use_file(entry: Path) -> Path:
    return entry.parent / f".{entry.name}.use"


def hold(entry: Path) -> None:
    """Mark ``entry`` in use by this process until it ends, and record now as its last use.

    Waits while a cleaner holds the entry (it then removes it: the caller finds it gone and extracts again).
    """
    key = str(entry)
    if key in _HELD:
        os.utime(use_file(entry))
        return
    path = use_file(entry)
    while True:
        f = open(path, "a")  # noqa: SIM115 - held open for the process's lifetime
        fcntl.flock(f, fcntl.LOCK_SH)
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # a cleaner removed it after we opened it
            same = False
        if same:
            break
        f.close()  # locked a file a cleaner has since unlinked: lock the current one
    os.utime(path)
    _HELD[key] = f


def release_unbuilt(entry: Path) -> None:
    """After building ``entry`` failed (a corrupt archive): stop holding it and, unless another process holds it
    too (its own extraction may still succeed), remove its ``.use`` file, so a failed run leaves the cache as it was."""
    held = _HELD.pop(str(entry), None)
    if held is not None:
        held.close()
    path = use_file(entry)
    try:
        f = open(path)  # noqa: SIM115
    except FileNotFoundError:
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another process holds it
        if not entry.exists():
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Entry:
    path: Path
    bytes: int  # on disk, files shared with an entry listed before it left out
    last_used: float  # Unix time: the .use file's mtime, else the folder's (entries from before this module)
    in_use: bool  # another process holds it now


def _size(path: Path, seen: set) -> int:
    """Bytes on disk of the files under ``path`` whose inodes are not in ``seen`` (which it extends): a file
    hard-linked from an entry counted before is counted there only (the embedded split links its extraction)."""
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
    path = use_file(entry)
    if str(entry) in _HELD:
        return True
    if not path.exists():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def entries(root: Path) -> list[Entry]:
    """The cache's entries under ``root``, least recently used first (unfinished extractions left out)."""
    if not root.is_dir():
        return []
    out, seen = [], set()
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not p.is_dir() or p.is_symlink():
            continue
        use = use_file(p)
        last = (use if use.exists() else p).stat().st_mtime
        out.append(Entry(path=p, bytes=_size(p, seen), last_used=last, in_use=_in_use(p)))
    return sorted(out, key=lambda e: e.last_used)


def clean(root: Path, *, older_than_days: float, now: float | None = None) -> tuple[list[Entry], list[Entry]]:
    """Remove the entries under ``root`` last used more than ``older_than_days`` ago and not in use now, and the
    hidden folders of extractions killed more than a day ago. Returns ``(removed, kept in use)``."""
    now = time.time() if now is None else now
    removed, busy = [], []
    for e in entries(root):
        if now - e.last_used < older_than_days * 86400:
            continue
        with open(use_file(e.path), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy.append(e)
                continue
            aside = root / f".{e.path.name}.removing-{os.getpid()}"
            os.replace(e.path, aside)  # from here no reader can open it; then delete at leisure
            use_file(e.path).unlink(missing_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(e)
    for p in root.iterdir() if root.is_dir() else ():
        unfinished = p.name.startswith(".") and (p.name.endswith(".tmp") or ".removing-" in p.name)
        if unfinished and p.is_dir() and now - p.stat().st_mtime > _UNFINISHED_AGE_S:
            shutil.rmtree(p, ignore_errors=True)
    return removed, busy


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
