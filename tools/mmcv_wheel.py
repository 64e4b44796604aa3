"""How tools/install.sh builds mmcv 2.1.0: CPU ops, or CUDA ops for named or local GPU architectures, and with what.

Plain stdlib, run by install.sh with the venv's python (it imports torch only when the torch facts are not given):

    python tools/mmcv_wheel.py plan [--arch 9.0]        # shell assignments: MMCV_KEY, MMCV_ARCH, MMCV_WHY
    python tools/mmcv_wheel.py plan --torch 2.14.1+cu130 --cuda 13.0 --gpu 9.0   # the same, torch facts given
    python tools/mmcv_wheel.py toolkit --shim DIR        # export lines: CUDA_HOME, CPATH, LIBRARY_PATH

``plan`` picks the CUDA branch only when an architecture is named (``--arch``, default ``$DAP_CUDA_ARCH``) or torch
sees a GPU (then the local GPUs' architectures only); otherwise CPU ops. ``MMCV_KEY`` names the wheel cache folder
after torch's version, its CUDA version and the architectures: ``mmcv-2.1.0-torch2.14.1-cu130-sm90`` or
``mmcv-2.1.0-torch2.14.1-cpu``. ``MMCV_ARCH`` is the ``TORCH_CUDA_ARCH_LIST`` to build with (empty: CPU ops).

``toolkit`` takes the first CUDA toolkit of ``$CUDA_HOME``, ``$CUDA_PATH``, nvcc on ``PATH`` and /usr/local/cuda
when its nvcc has torch's CUDA major version; where there is none it pip-installs nvcc and the CUDA headers for
torch's CUDA version into the running venv (``nvidia-cuda-nvcc`` etc.) and points ``CUDA_HOME`` there. ``CPATH``
gains the venv's ``nvidia/*/include`` folders: torch's headers include cuBLAS/cuSPARSE/cuSOLVER headers that a
toolkit without the math libraries lacks, and torch's own nvidia-* dependencies carry them. The pip packages ship
``libcudart.so.N`` but no ``libcudart.so`` to link with ``-lcudart``, so ``LIBRARY_PATH`` gains a folder with that
link.

Expected failures (a bad architecture string, a CPU-only torch asked for CUDA ops) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

MMCV_VERSION = "2.1.0"
ARCH_ENV = "DAP_CUDA_ARCH"
# Oldest architecture each CUDA major version compiles for (CUDA 12 dropped Kepler, CUDA 13 dropped Maxwell-Volta).
MIN_ARCH = {11: (3, 5), 12: (5, 0), 13: (7, 5)}
_ARCH_RE = re.compile(r"(?:sm_?)?(?P<major>\d{1,2})(?:\.(?P<minor>\d)|(?P<minor2>\d))(?P<suffix>[af]?)(?P<ptx>\+ptx)?")


class PlanError(ValueError):
    """An expected failure: install.sh prints the message as one line and exits 2."""


@dataclass(frozen=True)
class Plan:
    """What to build: ``arch`` is a TORCH_CUDA_ARCH_LIST value, empty for CPU ops."""

    key: str
    arch: str
    why: str


def parse_arch(text: str, cuda: str | None = None) -> list[str]:
    """``'9.0'``, ``'90'``, ``'sm_90'``, ``'9.0a'``, ``'8.6+PTX'``, several split by ``;``, ``,`` or spaces ->
    normalised TORCH_CUDA_ARCH_LIST entries (``['8.0', '9.0']``), sorted, duplicates dropped.

    Raises:
        PlanError: an entry that is not an architecture, or one older than ``cuda``'s compiler supports.
    """
    tokens = [t for t in re.split(r"[;,\s]+", text.strip()) if t]
    if not tokens:
        raise PlanError(f"empty CUDA architecture {text!r}: name one like 9.0 (H100), 8.0 (A100) or 8.6")
    out = set()
    for tok in tokens:
        m = _ARCH_RE.fullmatch(tok.lower())
        if not m:
            raise PlanError(f"bad CUDA architecture {tok!r}: name one like 9.0 (H100), 8.0 (A100), 8.6 or sm_90")
        major, minor = int(m["major"]), int(m["minor"] or m["minor2"])
        suffix = m["suffix"]
        if suffix and major < (9 if suffix == "a" else 10):
            raise PlanError(
                f"bad CUDA architecture {tok!r}: the '{suffix}' variants start at {9 if suffix == 'a' else 10}.0"
            )
        if cuda:
            cuda_major = int(cuda.split(".")[0])
            low = MIN_ARCH.get(cuda_major, MIN_ARCH[max(MIN_ARCH)])
            if (major, minor) < low:
                raise PlanError(
                    f"CUDA architecture {tok!r} is older than CUDA {cuda} supports ({low[0]}.{low[1]} and up)"
                )
        out.add(f"{major}.{minor}{suffix}{'+PTX' if m['ptx'] else ''}")
    return sorted(out, key=lambda a: (int(a.split(".")[0]), a))


def _arch_tag(arch: str) -> str:
    """'9.0' -> 'sm90', '9.0a' -> 'sm90a', '8.6+PTX' -> 'sm86ptx'."""
    return "sm" + arch.replace(".", "").replace("+PTX", "ptx")


def wheel_key(torch_version: str, cuda: str | None, archs: list[str]) -> str:
    """Cache folder name: ``mmcv-2.1.0-torch2.14.1-cu130-sm90`` (CUDA ops) or ``mmcv-2.1.0-torch2.14.1-cpu``."""
    torch_public = torch_version.split("+")[0]
    if not archs:
        return f"mmcv-{MMCV_VERSION}-torch{torch_public}-cpu"
    return f"mmcv-{MMCV_VERSION}-torch{torch_public}-cu{cuda.replace('.', '')}-" + "_".join(map(_arch_tag, archs))


def plan(torch_version: str, cuda: str | None, gpu_archs: list[str], named: str | None) -> Plan:
    """Choose the branch: a named architecture wins, then the local GPUs' architectures, else CPU ops.

    Args:
        torch_version: ``torch.__version__``.
        cuda: ``torch.version.cuda`` (None for a CPU or ROCm build of torch).
        gpu_archs: the visible GPUs' compute capabilities (``'9.0'``); empty where torch sees no GPU.
        named: the architecture(s) the user named (``$DAP_CUDA_ARCH``); None or empty when none.
    """
    if named and named.strip():
        if not cuda:
            raise PlanError(
                f"{ARCH_ENV}={named} asks for mmcv's CUDA ops but torch {torch_version} has no CUDA; "
                "install a CUDA build of torch"
            )
        archs = parse_arch(named, cuda)
        why = f"CUDA ops for {' '.join(map(_arch_tag, archs))} ({ARCH_ENV}={named})"
    elif gpu_archs and cuda:
        archs = parse_arch(";".join(gpu_archs), cuda)
        why = f"CUDA ops for {' '.join(map(_arch_tag, archs))} (the local GPU; {ARCH_ENV}=... names others)"
    else:
        archs = []
        why = f"CPU ops (torch sees no CUDA GPU; {ARCH_ENV}=9.0 builds CUDA ops for H100 without one)"
    return Plan(key=wheel_key(torch_version, cuda, archs), arch=";".join(archs), why=why)


def torch_facts() -> tuple[str, str | None, list[str]]:
    """(torch.__version__, torch.version.cuda, the visible CUDA GPUs' capabilities) from the installed torch."""
    import torch

    caps = []
    if torch.version.cuda and torch.cuda.is_available():
        caps = sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
    return torch.__version__, torch.version.cuda, caps


def toolkit_packages(cuda: str) -> list[str]:
    """The PyPI packages that hold nvcc and the CUDA headers for torch's CUDA ``major.minor``."""
    major, minor = (int(x) for x in cuda.split(".")[:2])
    mm = f"{major}.{minor}.*"
    if major >= 13:  # one merged tree: site-packages/nvidia/cu13/{bin,include,lib,nvvm}
        names = ["nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-cccl", "nvidia-cuda-runtime"]
        return [f"{n}=={mm}" for n in names]
    if major == 12:  # one folder per package: site-packages/nvidia/cuda_nvcc, nvidia/cuda_runtime, ...
        return [f"{n}-cu12=={mm}" for n in ("nvidia-cuda-nvcc", "nvidia-cuda-runtime", "nvidia-cuda-cccl")]
    raise PlanError(f"PyPI has no CUDA {cuda} compiler; install the CUDA {cuda} toolkit and set CUDA_HOME")


def nvcc_release(nvcc: Path) -> str | None:
    """``'13.0'`` from ``nvcc --version``; None when ``nvcc`` is missing or says no release."""
    if not nvcc.is_file():
        return None
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def system_cuda_home(env: dict[str, str], which=shutil.which) -> Path | None:
    """The first CUDA toolkit (bin/nvcc and include/cuda_runtime.h) of $CUDA_HOME, $CUDA_PATH, nvcc on PATH and
    /usr/local/cuda; None when there is none. (nvcc on PATH may be a link or a wrapper script elsewhere.)"""
    candidates = [Path(env[v]) for v in ("CUDA_HOME", "CUDA_PATH") if env.get(v)]
    nvcc = which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file():
            return home
    return None


def pip_cuda_home(site: Path) -> Path | None:
    """The pip-installed toolkit: the folder above ``site/nvidia/*/bin/nvcc`` (``nvidia/cu13``, ``cuda_nvcc``)."""
    found = sorted(site.glob("nvidia/*/bin/nvcc"))
    return found[0].parent.parent if found else None


def cudart_link_dir(home: Path, site: Path, cuda_major: int, shim: Path) -> Path | None:
    """A folder holding ``libcudart.so`` for ``-lcudart``; None when the toolkit has one already.

    Raises:
        PlanError: no ``libcudart.so.<cuda_major>`` in the toolkit nor in the venv's nvidia packages.
    """
    if any((home / d / "libcudart.so").exists() for d in ("lib64", "lib")):
        return None
    candidates = [home / d / f"libcudart.so.{cuda_major}" for d in ("lib64", "lib")]
    candidates += sorted(site.glob(f"nvidia/*/lib/libcudart.so.{cuda_major}"))
    for lib in candidates:
        if lib.is_file():
            shim.mkdir(parents=True, exist_ok=True)
            link = shim / "libcudart.so"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(lib)
            return shim
    raise PlanError(f"no libcudart.so.{cuda_major} under {home} or {site}/nvidia; reinstall torch's CUDA packages")


def toolkit_env(cuda: str, site: Path, shim: Path, env: dict[str, str], install=None, log=None) -> dict[str, str]:
    """Environment for building CUDA ops: CUDA_HOME, CPATH, LIBRARY_PATH.

    Args:
        cuda: torch's CUDA version (``'13.0'``).
        site: the venv's site-packages (where pip puts ``nvidia/...``).
        shim: a scratch folder for the ``libcudart.so`` link.
        env: the current environment (``os.environ``).
        install: called with the package list when no matching toolkit is found (default: pip into this venv).
        log: called with one line saying which nvcc and why (default: print to stderr).
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    major = int(cuda.split(".")[0])
    home = system_cuda_home(env)
    release = nvcc_release(home / "bin" / "nvcc") if home else None
    if release and int(release.split(".")[0]) == major:
        log(f"CUDA toolkit {home} (nvcc {release})")
    else:
        pkgs = toolkit_packages(cuda)
        found = f"{home} has nvcc {release}" if release else f"no nvcc in {home}" if home else "no nvcc found"
        log(f"no CUDA {major} toolkit ({found}); installing nvcc from PyPI: {' '.join(pkgs)}")
        (install or _pip_install)(pkgs)
        home = pip_cuda_home(site)
        if home is None:
            raise PlanError(f"installed {' '.join(pkgs)} but found no nvidia/*/bin/nvcc under {site}")
    out = {"CUDA_HOME": str(home)}
    includes = [str(p) for p in sorted(site.glob("nvidia/*/include"))]
    if includes:
        out["CPATH"] = os.pathsep.join(includes + ([env["CPATH"]] if env.get("CPATH") else []))
    link_dir = cudart_link_dir(home, site, major, shim)
    if link_dir:
        out["LIBRARY_PATH"] = os.pathsep.join(
            [str(link_dir)] + ([env["LIBRARY_PATH"]] if env.get("LIBRARY_PATH") else [])
        )
    return out


def _pip_install(pkgs: list[str]) -> None:
    # stdout goes to stderr: install.sh evals this program's stdout
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pkgs]
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def _shell(assignments: dict[str, str], export: bool = False) -> str:
    prefix = "export " if export else ""
    return "\n".join(f"{prefix}{k}={shlex.quote(v)}" for k, v in assignments.items())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcv_wheel.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plan", help="print MMCV_KEY, MMCV_ARCH, MMCV_WHY as shell assignments")
    pl.add_argument("--arch", default=os.environ.get(ARCH_ENV), help=f"architecture(s) to build for (${ARCH_ENV})")
    pl.add_argument("--torch", help="torch.__version__ (default: read from the installed torch)")
    pl.add_argument("--cuda", default="", help="torch.version.cuda; '' or 'none' for a CPU torch (with --torch)")
    pl.add_argument("--gpu", default="", help="visible GPUs' capabilities, e.g. '9.0'; '' for none (with --torch)")
    tk = sub.add_parser("toolkit", help="print export lines for CUDA_HOME, CPATH, LIBRARY_PATH")
    tk.add_argument("--shim", required=True, type=Path, help="scratch folder for the libcudart.so link")
    tk.add_argument("--cuda", help="torch.version.cuda (default: read from the installed torch)")
    tk.add_argument("--site", type=Path, default=Path(sysconfig.get_paths()["platlib"]), help="site-packages")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "plan":
            if args.torch:
                cuda = None if args.cuda.lower() in ("", "none") else args.cuda
                facts = args.torch, cuda, [a for a in re.split(r"[;,\s]+", args.gpu) if a]
            else:
                facts = torch_facts()
            p = plan(*facts, named=args.arch)
            print(_shell({"MMCV_KEY": p.key, "MMCV_ARCH": p.arch, "MMCV_WHY": p.why}))
        else:
            cuda = args.cuda or torch_facts()[1]
            if not cuda:
                raise PlanError("torch has no CUDA; the toolkit is only needed for mmcv's CUDA ops")
            print(_shell(toolkit_env(cuda, args.site, args.shim, dict(os.environ)), export=True))
    except PlanError as e:
        print(f"mmcv_wheel: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
