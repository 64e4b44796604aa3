"""Session fixtures: small real-image folders cut from ../shared/data (never written to)."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on 2 cores: one intra-op thread per test worker and per trainer it starts (they inherit the
    # environment), else four busy threads share two cores and each runs far slower than half speed.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# ../shared/data beside the checkout; a GPU job carries a copy inside the checkout (shared/data)
SHARED_DATA = next((p for p in (REPO.parent / "shared" / "data", REPO / "shared" / "data") if p.is_dir()), Path())


def _require(*modules: str) -> None:
    """Skip when ``modules`` are missing on a developer's machine; under ``CI=true`` fail instead (CI installs all)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        msg = f"{', '.join(missing)} not installed; run tools/install.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def _free_port() -> int:
    """A TCP port no process is listening on now, chosen by the OS (a DDP test's MASTER_PORT). Fixed ports, or
    ones derived from the pid, can collide between the two test workers or with an ephemeral port in use."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """``free_port()``: see :func:`_free_port`."""
    return _free_port


@pytest.fixture(scope="session")
def require():
    """``require('mmdet', ...)``: the one optional-dependency guard every test uses (see :func:`_require`)."""
    return _require


def _link_tree(pairs, root: Path) -> Path:
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            dst.write_bytes(src.read_bytes())
    return root


@pytest.fixture(scope="session")
def cifar_tiny(tmp_path_factory) -> Path:
    """Real CIFAR-10 JPEGs: train/ 40 and val/ 10 per class, cut from the embedded split."""
    from dap_pretrain.data.dataset import embedded_data_dir

    src = embedded_data_dir()
    root = tmp_path_factory.mktemp("cifar_tiny")
    pairs = []
    for split, n in (("train", 40), ("val", 10)):
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            pairs += [(f, root / split / cls.name / f.name) for f in sorted(cls.iterdir())[:n]]
    return _link_tree(pairs, root)


@pytest.fixture(scope="session")
def imagenet_tiny(tmp_path_factory) -> Path:
    """Real ImageNet images: the first 16 classes of imagenet_sample (one image each), as train/ and val/."""
    root = tmp_path_factory.mktemp("imagenet_tiny")
    classes = sorted(p for p in (SHARED_DATA / "imagenet_sample").iterdir() if p.is_dir())[:16]
    pairs = [(f, root / split / c.name / f.name) for split in ("train", "val") for c in classes for f in c.iterdir()]
    return _link_tree(pairs, root)
