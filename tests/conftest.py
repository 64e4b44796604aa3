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


# Test files by their seconds on cpu-2 under `-n 2 --dist loadfile` (--durations sums, 2026-11-28, commit 3e9d4e2:
# the suite in 714 s), the files above 40 s. xdist's loadfile hands each worker one file at a time; with its
# reordering off (pytest_configure below) it keeps the order given here, so these go first, longest first, and the
# many short files fill in at the end and the two workers finish together (by test count, xdist's default order,
# the GPU scripts' rehearsals started last and one worker idled for about 4 minutes). A file missing here only runs
# later.
LONGEST_FIRST = (
    "tests/downstream/test_transfer.py",  # 247 s
    "tests/test_train_resume_ddp.py",  # 219 s
    "tests/mm/test_mm_train.py",  # 204 s
    "tests/test_train.py",  # 129 s
    "tests/test_gpu_scripts_dry_run.py",  # 109 s
    "tests/test_paper_tables.py",  # 104 s
    "tests/test_faults_run_folder.py",  # 66 s
    "tests/test_multirun.py",  # 54 s
    "tests/test_benchmarks.py",  # 46 s
)


def pytest_configure(config):
    """xdist (3.x) orders its loadfile/loadscope work by test count unless told not to; the option is set here, not
    in pyproject's addopts, because pytest without xdist (or an older one, such as a GPU machine's) refuses it."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Runs the files of :data:`LONGEST_FIRST` first, in that order; the rest keep their order after them."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable within a file


def _shared_once(tmp_path_factory, name: str, build, *, worker: bool) -> Path:
    """``build(folder)`` once for the whole run, also across `pytest -n` workers (each has its own session
    fixtures): the first worker to get here builds ``name`` under the run's common temporary folder while holding a
    lock, later ones wait and reuse it. A build that fails leaves nothing, and the next worker tries again.
    ``worker``: this process is an xdist worker (its config has ``workerinput``; ``PYTEST_XDIST_WORKER`` would also
    be true in a pytest that a test starts, which then shares nothing)."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    root = base.parent if worker else base  # the workers' folders share a parent
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def shared_once(tmp_path_factory, request):
    """``shared_once(name, build)``: see :func:`_shared_once`."""
    worker = hasattr(request.config, "workerinput")
    return lambda name, build: _shared_once(tmp_path_factory, name, build, worker=worker)


@pytest.fixture(scope="session")
def free_port():
    """``free_port()``: see :func:`_free_port`."""
    return _free_port


@pytest.fixture
def ctrl_c_in_epoch(monkeypatch):
    """``ctrl_c_in_epoch(n)``: the trainer's n-th epoch from now (counted across the runs this test starts) is
    stopped as Ctrl-C stops it, a ``KeyboardInterrupt`` as it begins; later epochs train."""
    from dap_pretrain import runner

    real, state = runner.train_one_epoch, {"calls": 0, "at": None}

    def epoch(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] == state["at"]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    def arm(n: int) -> None:
        state.update(calls=0, at=n)

    monkeypatch.setattr(runner, "train_one_epoch", epoch)
    return arm


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
