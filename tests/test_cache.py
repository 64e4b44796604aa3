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
        assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(
            [by_name["recent"].name, by_name["held"].name]
        )
        assert not cache.use_file(by_name["old"]).exists()
    finally:
        reader.communicate("\n", timeout=60)
    # the reader has exited: its entry is no longer in use, and --older-than 0 takes every unused entry
    res = _cli("--cache-dir", str(root), "--clean", "--older-than", "0")
    assert res.returncode == 0 and "removed 2 entries" in res.stdout, res.stdout + res.stderr
    assert [p for p in root.iterdir() if not p.name.startswith(".")] == []
    # a removed archive is extracted again on its next use
    assert (resolve_data_dir(old, cache_dir=root) / "a" / "x.jpg").read_bytes() == b"old" * 100


def test_entries_from_before_the_use_files_and_killed_extractions(tmp_path):
    """An entry with no .use file counts as last used at its folder's mtime; a hidden extraction folder left by a
    killed process is removed once it is a day old."""
    root = tmp_path / "cache"
    legacy = root / "legacy-123-abc"
    legacy.mkdir(parents=True)
    (legacy / "f").write_bytes(b"z" * 100)
    killed, fresh = root / ".legacy2.x1.tmp", root / ".legacy3.x2.tmp"
    killed.mkdir()
    fresh.mkdir()
    old = time.time() - 3 * 86400
    for p in (legacy, killed):
        os.utime(p, (old, old))
    (entry,) = cache.entries(root)
    assert entry.path == legacy and entry.last_used == pytest.approx(old) and not entry.in_use
    removed, busy = cache.clean(root, older_than_days=1)
    assert [e.path for e in removed] == [legacy] and busy == []
    assert sorted(p.name for p in root.iterdir()) == [fresh.name]


def test_bad_days_are_one_line():
    res = _cli("--clean", "--older-than", "-1")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "--older-than=-1.0 is invalid" in res.stderr


def test_a_read_only_cache_with_the_entry_is_read_and_without_it_is_one_error(tmp_path, monkeypatch):
    from dap_pretrain.data.dataset import DataError

    root = tmp_path / "cache"
    archive = _archive(tmp_path, "shared", b"s" * 100)
    subprocess.run([sys.executable, "-c", f"from dap_pretrain.data.dataset import resolve_data_dir as r; "
                    f"r({str(archive)!r}, cache_dir={str(root)!r})"], cwd=REPO, check=True, timeout=120)  # fmt: skip

    def refuse(entry):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache, "hold", refuse)
    assert (resolve_data_dir(archive, cache_dir=root) / "a" / "x.jpg").read_bytes() == b"s" * 100
    with pytest.raises(DataError, match="cannot write the dataset cache .*Permission denied"):
        resolve_data_dir(_archive(tmp_path, "other", b"o"), cache_dir=root)
