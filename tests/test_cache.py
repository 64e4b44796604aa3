"""The dataset cache: entries listed with their size and last use; --clean removes only unused, old ones."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from dap_pretrain.data import cache
from dap_pretrain.data.dataset import resolve_data_dir

REPO = Path(__file__).resolve().parents[1]


def _archive(tmp_path: Path, name: str, payload: bytes) -> Path:
    src = tmp_path / f"src_{name}" / "a"
    src.mkdir(parents=True)
    (src / "x.jpg").write_bytes(payload)
    path = tmp_path / f"{name}.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(src.parent, arcname=name)
    return path


def _age(entry: Path, days: float) -> None:
    old = time.time() - days * 86400
    os.utime(cache.use_file(entry), (old, old))


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dap_pretrain", "cache", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)  # fmt: skip


def test_entries_are_listed_with_their_size_and_last_use(tmp_path):
    root = tmp_path / "cache"
    resolve_data_dir(_archive(tmp_path, "small", b"x" * 10_000), cache_dir=root)
    (entry,) = cache.entries(root)
    assert entry.path.name.startswith("small-") and entry.bytes >= 10_000
    assert time.time() - entry.last_used < 60 and entry.in_use  # this process holds it
    res = _cli("--cache-dir", str(root))
    assert res.returncode == 0, res.stderr
    assert entry.path.name in res.stdout and "1 entries" in res.stdout and "in use" in res.stdout


def test_clean_removes_old_unused_entries_and_keeps_recent_or_held_ones(tmp_path):
    root = tmp_path / "cache"
    old, recent, held = (_archive(tmp_path, n, n.encode() * 100) for n in ("old", "recent", "held"))

    # a reader in another process holds "held" until it exits
    def use(*archives) -> str:
        calls = "; ".join(f"r({str(a)!r}, cache_dir={str(root)!r})" for a in archives)
        return f"from dap_pretrain.data.dataset import resolve_data_dir as r; {calls}"

    reader = subprocess.Popen([sys.executable, "-c", use(held) + "; print('ready', flush=True); input()"], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert reader.stdout.readline().strip() == "ready"
        subprocess.run([sys.executable, "-c", use(old, recent)], cwd=REPO, check=True, timeout=120)  # then released
        by_name = {e.path.name.split("-")[0]: e.path for e in cache.entries(root)}
        _age(by_name["old"], 40)
        _age(by_name["held"], 40)
        _age(by_name["recent"], 2)
        res = _cli("--cache-dir", str(root), "--clean")
        assert res.returncode == 0, res.stderr
        assert f"removed {by_name['old'].name}" in res.stdout
        assert f"kept {by_name['held'].name}: in use by another process" in res.stdout
        assert sorted(p.name for p in root.iterdir() if cache.ENTRY_NAME.fullmatch(p.name)) == sorted(
            [by_name["recent"].name, by_name["held"].name]
        )
        assert not cache.use_file(by_name["old"]).exists()
    finally:
        reader.communicate("\n", timeout=60)
    # the reader has exited: its entry is no longer in use, and --older-than 0 takes every unused entry
    res = _cli("--cache-dir", str(root), "--clean", "--older-than", "0")
    assert res.returncode == 0 and "removed 2 entries" in res.stdout, res.stdout + res.stderr
    assert [p for p in root.iterdir() if cache.ENTRY_NAME.fullmatch(p.name)] == []
    # a removed archive is extracted again on its next use
    assert (resolve_data_dir(old, cache_dir=root) / "a" / "x.jpg").read_bytes() == b"old" * 100


def test_only_entries_are_touched_and_only_in_a_tagged_cache(tmp_path):
    """An entry with no .use file (from before them) counts as last used at its folder's mtime. Folders not named
    like entries, extractions in progress (hidden .tmp) and any folder outside a tagged cache are never removed;
    an entry a killed cleaner had renamed aside is."""
    import fcntl

    root = tmp_path / "cache"
    legacy, older_key = root / "legacy-123-0123456789abcdef", root / "cifar-3291257-1764000000-split800"
    mine = root / "projects"
    extracting, killed = root / ".run-1-0123456789abcdef.x1y2z3w4.tmp", root / ".dead-1-0123456789abcdef.a1b2c3d4.tmp"
    aside = root / ".old-9-0123456789abcdef.removing-0badc0de"
    for p in (legacy, older_key, mine, extracting, killed, aside):
        p.mkdir(parents=True)
        (p / "f").write_bytes(b"z" * 100)
    old = time.time() - 3 * 86400
    for p in (legacy, older_key, mine, extracting, killed):
        os.utime(p, (old, old))
    res = _cli("--cache-dir", str(root), "--clean", "--older-than", "1")
    assert res.returncode == 2 and "is not a dap-pretrain dataset cache (no CACHEDIR.TAG)" in res.stderr
    assert legacy.is_dir() and aside.is_dir() and killed.is_dir()  # nothing touched without the tag
    (root / cache.TAG).write_text(cache._TAG_TEXT)
    found = cache.entries(root)
    assert {e.path for e in found} == {legacy, older_key}  # both key formats; last used: the folder's mtime
    assert all(e.last_used == pytest.approx(old) and not e.in_use for e in found)
    with open(cache.use_file(root / "run-1-0123456789abcdef"), "a") as extractor:  # its extractor holds the entry
        fcntl.flock(extractor, fcntl.LOCK_SH)
        res = _cli("--cache-dir", str(root), "--clean", "--older-than", "1")
    assert res.returncode == 0 and f"removed {legacy.name}" in res.stdout and f"removed {older_key.name}" in res.stdout
    left = sorted(p.name for p in root.iterdir() if not p.name.endswith(".use"))
    assert left == sorted([cache.TAG, mine.name, extracting.name])  # the killed extraction's folder is gone


def test_one_cleaner_at_a_time(tmp_path):
    import fcntl

    root = tmp_path / "cache"
    root.mkdir()
    (root / cache.TAG).write_text(cache._TAG_TEXT)
    guard = os.open(root, os.O_RDONLY)  # what a running cleaner holds: the cache folder itself
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        res = _cli("--cache-dir", str(root), "--clean")
    finally:
        os.close(guard)
    assert res.returncode == 2 and "another `cache --clean` is running" in res.stderr, res.stderr


def test_the_embedded_extraction_and_its_split_go_together(tmp_path, capsys):
    """The split hard-links the extraction's files: removing one alone would free nothing, and the listing, which
    counts them with the extraction, says so beside the split's size."""
    root = tmp_path / "cache"
    key = "cifar10_test_jpg-3291257-75d84991587e9621"
    extraction, split = root / key, root / f"{key}-split800"
    (extraction / "a").mkdir(parents=True)
    (extraction / "a" / "x.jpg").write_bytes(b"j" * 5000)
    (split / "a").mkdir(parents=True)
    os.link(extraction / "a" / "x.jpg", split / "a" / "x.jpg")
    for p, days in ((extraction, 40), (split, 2)):
        cache.use_file(p).touch()
        _age(p, days)
    sizes = {e.path.name: e.bytes for e in cache.entries(root)}
    assert sizes[key] >= 5000 and sizes[split.name] < 5000  # the shared file is counted once
    from dap_pretrain.cli import main

    main(["cache", "--cache-dir", str(root)])  # the listing says why the split shows (almost) nothing
    listed = [line for line in capsys.readouterr().out.splitlines() if split.name in line]
    assert listed and listed[0].endswith(f"; its files are hard links into {key}, counted there)"), listed
    assert cache.clean(root, older_than_days=30) == ([], [])  # the split was used 2 days ago: both stay
    _age(split, 40)
    removed, _ = cache.clean(root, older_than_days=30)
    assert sorted(e.path.name for e in removed) == sorted([key, split.name])


def test_a_holder_whose_use_file_was_replaced_locks_the_current_one(tmp_path, monkeypatch):
    """A cleaner can unlink the .use file between a reader's open and its lock; the reader must not keep a lock
    on the unlinked file (a later cleaner would not see it)."""
    import fcntl

    entry = tmp_path / "cache" / "e-1-0123456789abcdef"
    entry.mkdir(parents=True)
    path = cache.use_file(entry)
    path.touch()
    real, calls = fcntl.flock, []

    def flock_after_a_cleaner(f, op):
        if not calls:  # the first lock attempt: meanwhile a cleaner replaced the file
            path.unlink()
            path.touch()
        calls.append(op)
        return real(f, op)

    monkeypatch.setattr(cache.fcntl, "flock", flock_after_a_cleaner)
    assert cache.hold(entry)
    monkeypatch.setattr(cache.fcntl, "flock", real)
    assert len(calls) == 2  # locked again after seeing the replacement
    held = cache._HELD.pop(str(entry))
    assert os.fstat(held.fileno()).st_ino == path.stat().st_ino
    held.close()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--clean", "--older-than", "-1"], "--older-than -1 is invalid"),
        (["--clean", "--older-than", "nan"], "--older-than nan is invalid"),
        (["--older-than", "5"], "--older-than says which entries --clean removes; add --clean"),
        (["--cache-dir", "/no/such/cache"], "--cache-dir '/no/such/cache' is not a folder"),
        (["--cache-dir", "", "--clean"], "--cache-dir '' is not a folder"),
    ],
)
def test_bad_cache_flags_are_one_line(args, words):
    res = _cli(*args)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert words in res.stderr


def test_an_entry_that_cannot_be_marked_is_read_and_an_unwritable_cache_is_one_error(tmp_path, monkeypatch):
    """Another user's read-only cache (the .use file can be neither created nor opened) or a file system without
    locks: the entry is read unmarked. A cache folder that cannot be made is a one-line DataError."""
    from dap_pretrain.data.dataset import DataError

    root = tmp_path / "cache"
    archive = _archive(tmp_path, "shared", b"s" * 100)
    subprocess.run([sys.executable, "-c", f"from dap_pretrain.data.dataset import resolve_data_dir as r; "
                    f"r({str(archive)!r}, cache_dir={str(root)!r})"], cwd=REPO, check=True, timeout=120)  # fmt: skip

    def refuse(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache, "_open_use", refuse)
    assert (resolve_data_dir(archive, cache_dir=root) / "a" / "x.jpg").read_bytes() == b"s" * 100
    monkeypatch.undo()

    def no_locks(f, op):
        raise OSError(37, "No locks available")  # ENOLCK

    monkeypatch.setattr(cache.fcntl, "flock", no_locks)
    other = _archive(tmp_path, "other", b"o" * 10)
    assert (resolve_data_dir(other, cache_dir=root) / "a" / "x.jpg").read_bytes() == b"o" * 10  # extracted anyway
    monkeypatch.undo()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="cannot write the dataset cache"):
        resolve_data_dir(_archive(tmp_path, "third", b"t"), cache_dir=tmp_path / "a_file" / "cache")


def _stale_entry(tmp_path) -> tuple[Path, cache.Entry]:
    root = tmp_path / "cache"
    entry = root / "e-1-0123456789abcdef"
    entry.mkdir(parents=True)
    cache.use_file(entry).touch()
    _age(entry, 40)
    (found,) = cache.entries(root)
    return root, found


def test_the_cleaner_rechecks_under_its_lock(tmp_path, monkeypatch):
    """Between the listing and the exclusive lock, a reader may use the entry (its .use touched) or a cleaner and a
    new reader may replace the .use file: either way the entry stays."""
    import fcntl

    root, found = _stale_entry(tmp_path)
    os.utime(cache.use_file(found.path))  # used again after the listing
    assert not cache._remove(found, root, older_than_days=30, now=time.time()) and found.path.is_dir()
    _age(found.path, 40)
    real = fcntl.flock

    def replaced_meanwhile(f, op):
        path = cache.use_file(found.path)
        path.unlink()
        path.touch()  # a new reader's file
        return real(f, op)

    monkeypatch.setattr(cache.fcntl, "flock", replaced_meanwhile)
    assert not cache._remove(found, root, older_than_days=30, now=time.time()) and found.path.is_dir()
    monkeypatch.setattr(cache.fcntl, "flock", real)
    _age(found.path, 40)  # the new reader's file, old now too
    assert cache._remove(found, root, older_than_days=30, now=time.time()) and not found.path.exists()


def test_a_read_only_mount_is_read_with_a_shared_lock(tmp_path, monkeypatch):
    """A container's read-only volume refuses writes with EROFS: the .use file is opened read-only, and the shared
    lock still keeps cleaners on the host away."""
    import builtins
    import errno

    root, found = _stale_entry(tmp_path)

    def read_only(path, mode="r", *args, **kwargs):
        if "a" in mode:
            raise OSError(errno.EROFS, "Read-only file system")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(cache, "open", read_only, raising=False)
    assert cache.hold(found.path)
    monkeypatch.undo()
    assert (root / cache.TAG).is_file()  # hold() marked the folder as this cache
    res = _cli("--cache-dir", str(root), "--clean", "--older-than", "1")
    assert res.returncode == 0 and "in use by another process" in res.stdout and found.path.is_dir(), res.stdout
    cache._HELD.pop(str(found.path)).close()


def test_a_legacy_entry_used_after_the_listing_stays(tmp_path):
    """An entry from before the .use files is listed by its folder's mtime; a reader that uses it (creating its
    .use file) before the cleaner locks it keeps it."""
    root = tmp_path / "cache"
    entry = root / "old-1-1764000000"
    entry.mkdir(parents=True)
    old = time.time() - 40 * 86400
    os.utime(entry, (old, old))
    (found,) = cache.entries(root)
    real_open = os.open

    def reader_first(path, flags, *args):
        if str(path) == str(cache.use_file(entry)) and not cache.use_file(entry).exists():
            os.close(real_open(path, os.O_CREAT | os.O_WRONLY, 0o644))  # a reader came and went just before
        return real_open(path, flags, *args)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(cache.os, "open", reader_first)
        assert not cache._remove(found, root, older_than_days=30, now=time.time()) and entry.is_dir()
    cache.use_file(entry).unlink()
    assert cache._remove(found, root, older_than_days=30, now=time.time()) and not entry.exists()
