"""tools/install.sh without a package registry (DAP_WHEELHOUSE) and with the system's torch (DAP_SYSTEM_TORCH):
the refusals that come before any pip call. The offline install itself is minutes of pip; docs/TRANSFER.md has it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _install(root: Path, **env: str) -> subprocess.CompletedProcess:
    """tools/install.sh copied into ``root`` (so its .venv is ``root/.venv``), run with ``env`` added."""
    (root / "tools").mkdir(exist_ok=True)
    shutil.copy(REPO / "tools" / "install.sh", root / "tools" / "install.sh")
    full = {"PATH": os.environ["PATH"], "HOME": str(root), **env}
    return subprocess.run(["bash", str(root / "tools" / "install.sh")], capture_output=True, text=True, env=full)


def _one_line_exit_2(p: subprocess.CompletedProcess, *words: str) -> None:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr)
    assert lines[0].startswith("install.sh: error: ") and all(w in lines[0] for w in words), lines[0]


def test_missing_wheelhouse_is_refused_before_anything_is_made(tmp_path):
    p = _install(tmp_path, DAP_WHEELHOUSE=str(tmp_path / "nowhere"), PYTHON=sys.executable)
    _one_line_exit_2(p, "DAP_WHEELHOUSE", "nowhere", "not a folder")
    assert not (tmp_path / ".venv").exists()


def test_system_torch_needs_a_python_that_has_it(tmp_path):
    bare = tmp_path / "bare"  # a venv with nothing in it: no torch
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    p = _install(tmp_path, DAP_SYSTEM_TORCH="1", PYTHON=str(bare / "bin" / "python"))
    _one_line_exit_2(p, "DAP_SYSTEM_TORCH=1", "cannot import torch")
    assert not (tmp_path / ".venv").exists()


def test_an_existing_venv_that_cannot_see_the_system_torch_is_not_reused(tmp_path):
    venv = tmp_path / ".venv"
    venv.mkdir()
    cfg = "home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11.7\n"
    (venv / "pyvenv.cfg").write_text(cfg)
    p = _install(tmp_path, DAP_SYSTEM_TORCH="1", PYTHON=sys.executable)  # this interpreter has torch and timm
    _one_line_exit_2(p, "without DAP_SYSTEM_TORCH=1", "remove")
    assert (venv / "pyvenv.cfg").read_text() == cfg  # left as it was


def test_the_system_packages_reach_the_new_venv_through_a_pth_file(tmp_path):
    """.venv lists ``$PYTHON``'s package folders in a .pth file, not --system-site-packages: with ``$PYTHON`` itself
    a venv (this test's interpreter is one, as the H100s' is) that would show its base Python's packages instead."""
    assert sys.prefix != sys.base_prefix, "run the tests from .venv"
    empty = tmp_path / "wheelhouse"
    empty.mkdir()
    p = _install(tmp_path, DAP_SYSTEM_TORCH="1", DAP_WHEELHOUSE=str(empty), PYTHON=sys.executable)
    assert p.returncode != 0  # the empty wheelhouse stops it at the first pip call, after .venv is made
    venv = tmp_path / ".venv"
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    assert (venv / ".dap-system-torch").read_text().strip() == sys.executable
    pth = next(venv.glob("lib/python*/site-packages/_dap_system_site.pth")).read_text().split()
    assert pth == [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    probe = "import torch, timm, sys; print(sys.path.index(torch.__path__[0].rsplit('/', 1)[0]) > 0)"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
