"""tools/install.sh's mmcv decisions (tools/mmcv_wheel.py): branch, cache key, toolkit; never the real build."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "mmcv_wheel.py"

_spec = importlib.util.spec_from_file_location("mmcv_wheel", SCRIPT)
mw = sys.modules["mmcv_wheel"] = importlib.util.module_from_spec(_spec)  # tools/ is not a package
_spec.loader.exec_module(mw)

TORCH = "2.14.1+cu130"


def _plan(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the script as install.sh does (torch facts given, so torch is never imported)."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "plan", *args], capture_output=True, text=True, env=env or {"PATH": "/usr/bin"}
    )


# --- branch: CUDA only when torch sees a GPU or an architecture is named ---


def test_no_gpu_no_arch_builds_cpu_ops_under_the_old_cache_key():
    p = mw.plan(TORCH, "13.0", gpu_archs=[], named=None)
    assert p.arch == ""
    assert p.key == "mmcv-2.1.0-torch2.14.1-cpu"  # the key install.sh used before: existing CPU caches stay valid
    assert mw.plan(TORCH, "13.0", gpu_archs=[], named="  ").arch == ""


def test_local_gpu_builds_for_its_architecture_only():
    p = mw.plan(TORCH, "13.0", gpu_archs=["9.0"], named=None)
    assert (p.arch, p.key) == ("9.0", "mmcv-2.1.0-torch2.14.1-cu130-sm90")
    assert "local GPU" in p.why
    assert mw.plan(TORCH, "13.0", gpu_archs=["8.0", "9.0", "9.0"], named=None).arch == "8.0;9.0"  # mixed node


def test_named_architecture_builds_cuda_ops_without_a_gpu_and_wins_over_the_local_one():
    assert mw.plan(TORCH, "13.0", gpu_archs=[], named="9.0").arch == "9.0"
    p = mw.plan(TORCH, "13.0", gpu_archs=["9.0"], named="8.0;9.0")
    assert p.arch == "8.0;9.0" and "DAP_CUDA_ARCH=8.0;9.0" in p.why


def test_torch_without_cuda_never_takes_the_cuda_branch_unless_asked():
    assert mw.plan("2.14.1+cpu", None, gpu_archs=["9.0"], named=None).arch == ""  # e.g. a ROCm torch: no CUDA ops
    with pytest.raises(mw.PlanError, match="has no CUDA"):
        mw.plan("2.14.1+cpu", None, gpu_archs=[], named="9.0")


def test_plan_reads_dap_cuda_arch_and_prints_shell_assignments(tmp_path):
    out = _plan("--torch", TORCH, "--cuda", "13.0", env={"PATH": "/usr/bin", "DAP_CUDA_ARCH": "8.0;9.0"})
    assert out.returncode == 0, out.stderr
    script = f'eval "$(cat {tmp_path / "plan"})"; echo "$MMCV_KEY|$MMCV_ARCH|$MMCV_WHY"'
    (tmp_path / "plan").write_text(out.stdout)
    echoed = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert echoed == "mmcv-2.1.0-torch2.14.1-cu130-sm80_sm90|8.0;9.0|CUDA ops for sm80 sm90 (DAP_CUDA_ARCH=8.0;9.0)"
    cpu = _plan("--torch", TORCH, "--cuda", "13.0", "--gpu", "")
    assert "MMCV_ARCH=''" in cpu.stdout


# --- cache key: one per torch version, CUDA version and architecture ---


def test_key_differs_per_torch_cuda_and_architecture():
    torches, cudas, archs = ["2.14.1+cu130", "2.13.0+cu130"], ["13.0", "12.8"], [["9.0"], ["8.0"], ["8.0", "9.0"]]
    keys = {mw.wheel_key(t, c, a) for t, c, a in itertools.product(torches, cudas, archs)}
    assert len(keys) == len(torches) * len(cudas) * len(archs)
    assert mw.wheel_key("2.14.1+cu128", "12.8", ["9.0a"]) == "mmcv-2.1.0-torch2.14.1-cu128-sm90a"
    assert mw.wheel_key("2.14.1", "13.0", []) == "mmcv-2.1.0-torch2.14.1-cpu"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("9.0", ["9.0"]),
        ("90", ["9.0"]),
        ("sm_90", ["9.0"]),
        ("SM90A", ["9.0a"]),
        ("10.0f", ["10.0f"]),
        ("120", ["12.0"]),
        ("8.6+PTX", ["8.6+PTX"]),
        ("9.0 8.0,8.0;", ["8.0", "9.0"]),
        ("10.0;9.0", ["9.0", "10.0"]),
    ],
)
def test_parse_arch_normalises_to_torch_cuda_arch_list(text, expected):
    assert mw.parse_arch(text, "13.0") == expected


# --- bad architecture strings: one line, exit 2 ---


@pytest.mark.parametrize("bad", ["hopper", "9", "9.0.1", "sm_", "9.x", "8.0a", "9.0f", "6.1", "90;h100", ";"])
def test_bad_arch_is_one_line_and_exit_2(bad):
    out = _plan("--torch", TORCH, "--cuda", "13.0", "--arch", bad)
    assert out.returncode == 2
    assert out.stdout == ""  # install.sh evals stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmcv_wheel: error: "), out.stderr


def test_arch_older_than_torchs_cuda_supports_is_refused():
    assert mw.parse_arch("6.1", "12.4") == ["6.1"]
    with pytest.raises(mw.PlanError, match="older than CUDA 13.0 supports"):
        mw.parse_arch("6.1", "13.0")


# --- toolkit: a matching nvcc is used; otherwise nvcc and headers come from PyPI ---


def _fake_toolkit(root: Path, release: str) -> Path:
    nvcc = root / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.88'\n")
    nvcc.chmod(0o755)
    (root / "include").mkdir(exist_ok=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def _fake_site(site: Path, major: int = 13) -> Path:
    """torch's CUDA runtime packages as pip lays them out: headers and libcudart.so.N, no libcudart.so."""
    (site / f"nvidia/cu{major}/include").mkdir(parents=True)
    (site / f"nvidia/cu{major}/lib").mkdir(parents=True)
    (site / f"nvidia/cu{major}/lib/libcudart.so.{major}").write_bytes(b"")
    return site


def test_toolkit_packages_match_torchs_cuda_version():
    assert mw.toolkit_packages("13.0") == [
        "nvidia-cuda-nvcc==13.0.*",
        "nvidia-nvvm==13.0.*",
        "nvidia-cuda-crt==13.0.*",
        "nvidia-cuda-cccl==13.0.*",
        "nvidia-cuda-runtime==13.0.*",
    ]
    assert mw.toolkit_packages("12.8")[0] == "nvidia-cuda-nvcc-cu12==12.8.*"
    with pytest.raises(mw.PlanError, match="no CUDA 11.8 compiler"):
        mw.toolkit_packages("11.8")


def test_matching_system_toolkit_is_used_and_nothing_is_installed(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda", "13.0")
    (home / "lib64").mkdir()
    (home / "lib64" / "libcudart.so").write_bytes(b"")
    site = _fake_site(tmp_path / "site")

    def no_install(pkgs):
        raise AssertionError(f"installed {pkgs}")

    said = []
    env = mw.toolkit_env("13.0", site, tmp_path / "shim", {"CUDA_HOME": str(home)}, install=no_install, log=said.append)
    assert env["CUDA_HOME"] == str(home) and said == [f"CUDA toolkit {home} (nvcc 13.0)"]
    assert env["CPATH"] == str(site / "nvidia/cu13/include")  # cuBLAS/cuSPARSE headers the toolkit may lack
    assert "LIBRARY_PATH" not in env


def test_no_matching_toolkit_installs_nvcc_from_pypi_and_points_cuda_home_there(tmp_path):
    old = _fake_toolkit(tmp_path / "cuda-12.4", "12.4")
    site = _fake_site(tmp_path / "site")
    installed = []

    def pip(pkgs):  # what pip would unpack: nvcc into the same nvidia/cu13 tree
        installed.extend(pkgs)
        _fake_toolkit(site / "nvidia/cu13", "13.0")

    said = []
    env = {"CUDA_HOME": str(old), "LIBRARY_PATH": "/x"}
    env = mw.toolkit_env("13.0", site, tmp_path / "shim", env, install=pip, log=said.append)
    assert installed == mw.toolkit_packages("13.0")
    assert env["CUDA_HOME"] == str(site / "nvidia/cu13")
    assert len(said) == 1 and f"{old} has nvcc 12.4" in said[0] and "nvidia-cuda-nvcc==13.0.*" in said[0]
    link = tmp_path / "shim" / "libcudart.so"
    assert env["LIBRARY_PATH"] == f"{tmp_path / 'shim'}:/x"
    assert link.resolve() == (site / "nvidia/cu13/lib/libcudart.so.13").resolve()


def test_system_cuda_home_follows_an_nvcc_link_on_path(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda", "13.0")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    assert mw.system_cuda_home({}, which=lambda _: str(tmp_path / "bin" / "nvcc")) == home
    other = _fake_toolkit(tmp_path / "opt-cuda", "13.0")
    assert mw.system_cuda_home({"CUDA_PATH": str(other)}, which=lambda _: str(home / "bin" / "nvcc")) == other
    # a wrapper script on PATH (#!/bin/sh exec .../nvcc) is no toolkit: $CUDA_HOME/include would be missing
    (tmp_path / "wrapped" / "bin").mkdir(parents=True)
    (tmp_path / "wrapped" / "bin" / "nvcc").write_text("#!/bin/sh\nexec /elsewhere/nvcc")
    found = mw.system_cuda_home({}, which=lambda _: str(tmp_path / "wrapped" / "bin" / "nvcc"))
    assert found != tmp_path / "wrapped"


def test_install_sh_parses():
    subprocess.run(["bash", "-n", str(REPO / "tools" / "install.sh")], check=True)


def test_installed_xtcocotools_masks_work_on_numpy_2(require):
    """install.sh patches xtcocotools' _mask.pyx for numpy 2 (np.NPY_OWNDATA is gone): its mask functions run."""
    require("xtcocotools")
    import numpy as np
    from xtcocotools import mask

    rle = mask.encode(np.asfortranarray(np.pad(np.ones((3, 4), np.uint8), ((1, 0), (2, 0)))[:, :, None]))
    assert mask.toBbox(rle).tolist() == [[2.0, 1.0, 4.0, 3.0]]
    assert mask.iou(rle, rle, [0]).tolist() == [[1.0]]
