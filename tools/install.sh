#!/usr/bin/env bash
# One-command install: creates .venv in the repo root with torch, timm, this project and the
# mm stack (mmengine, mmcv built once into a wheel cache, mmdet, mmpose, mmpretrain).
#
#   bash tools/install.sh            # everything (first run builds mmcv: ~20 min on 2 cores)
#   DAP_NO_MM=1 bash tools/install.sh  # timm pretraining only, no mmdet/mmpose/mmpretrain
#
# Machines without a package registry (air-gapped clusters, the GPU machines lent here):
#   DAP_WHEELHOUSE=DIR: pip installs from DIR only (--no-index --find-links DIR), e.g. a folder filled by
#     `pip download` on a connected machine. The mmcv wheel must already be in the wheel cache (below): it is
#     looked up by its key, and a missing one is a one-line error naming the key, not a build.
#   DAP_SYSTEM_TORCH=1: the venv sees $PYTHON's site-packages and keeps the torch, torchvision and timm found there
#     instead of installing the pinned torch 2.14.1 / torchvision 0.29.1 / timm 1.0.31 (a cluster's own CUDA build);
#     this project is installed without its pins, and the run says which versions it kept.
#
# mmcv's ops (tools/mmcv_wheel.py decides; its docstring has the details):
#   - torch sees an NVIDIA GPU: CUDA ops for the local GPU's architecture only (nvcc from $CUDA_HOME, PATH or
#     /usr/local/cuda when its major version matches torch's CUDA; else pip-installed into .venv from PyPI)
#   - DAP_CUDA_ARCH=9.0 bash tools/install.sh: CUDA ops for the named architecture(s) on any machine, GPU or not
#     (9.0 = H100/H200, 8.0 = A100, 8.6 = RTX 30xx; several as "8.0;9.0"): build once, carry the wheel
#   - otherwise CPU ops.
# FORCE_CUDA and TORCH_CUDA_ARCH_LIST are not read; DAP_CUDA_ARCH replaces them. The wheel cache key names torch,
# its CUDA version and the architectures (mmcv-2.1.0-torch2.14.1-cu130-sm90 vs mmcv-2.1.0-torch2.14.1-cpu).
# A CUDA build for one architecture took 53 min on 2 shared cores (sm90, torch 2.11.0+cu130, nvcc 13.0; wheel 5.9 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV="$PWD/.venv"
WHEELS=${DAP_WHEEL_CACHE:-$HOME/.cache/dap-pretrain/wheels}
fail() { echo "install.sh: error: $*" >&2; exit 2; }
if [ "${DAP_INSTALL_TRACE:-0}" = 1 ]; then PS4='+ $(date +%T) '; set -x; fi  # each command, timed

offline=0
if [ -n "${DAP_WHEELHOUSE:-}" ]; then
  [ -d "$DAP_WHEELHOUSE" ] || fail "DAP_WHEELHOUSE=$DAP_WHEELHOUSE is not a folder; point it at the folder of wheels"
  PIP_FIND_LINKS=$(cd "$DAP_WHEELHOUSE" && pwd)
  export PIP_NO_INDEX=1 PIP_FIND_LINKS
  offline=1
fi
system_torch=${DAP_SYSTEM_TORCH:-0}
if [ "$system_torch" = 1 ]; then
  "$PY" -c 'import torch, torchvision, timm' 2>/dev/null \
    || fail "DAP_SYSTEM_TORCH=1, but $PY cannot import torch, torchvision and timm; install them for $PY or unset it"
fi
if [ -f "$VENV/pyvenv.cfg" ]; then
  made=$([ -f "$VENV/.dap-system-torch" ] && echo 1 || echo 0)
  [ "$made" = "$system_torch" ] || fail "$VENV was made $([ "$made" = 1 ] && echo with || echo without)" \
    "DAP_SYSTEM_TORCH=1 and this run asks otherwise; remove $VENV or set DAP_SYSTEM_TORCH=$made"
fi
if [ ! -x "$VENV/bin/python" ]; then
  # A Python without ensurepip (Debian without python3-venv) makes a venv without pip; pip then comes from the
  # system's packages, which the venv sees.
  "$PY" -m venv "$VENV" 2>/dev/null || "$PY" -m venv --without-pip "$VENV"
  if [ "$system_torch" = 1 ]; then
    # .venv sees the package folders $PY sees, listed in a .pth file (after .venv's own: what pip installs here
    # comes first). Not --system-site-packages: a venv made from a venv (a cluster's or a container's torch venv,
    # as on the lent H100s) would then see the base Python's packages, not $PY's.
    echo "$PY" >"$VENV/.dap-system-torch"
    purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$PY" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
      >"$purelib/_dap_system_site.pth"
  fi
fi
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 \
  || fail "$VENV has no pip and $PY brings none; install python3-venv (or pip) for $PY"
pip_() { "$VENV/bin/python" -m pip "$@"; }
if [ "$system_torch" = 1 ]; then
  pip_ install -q 'setuptools>=77.0.3,<81'  # builds the editable install below without build isolation
  pip_ install -q --no-deps --no-build-isolation -e .
  pip_ install -q safetensors 'pyyaml>=6' matplotlib numpy
  "$VENV/bin/python" -c 'import torch, torchvision, timm
print(f"kept the system packages: torch {torch.__version__}, torchvision {torchvision.__version__}, timm",
      f"{timm.__version__} (pinned elsewhere: torch 2.14.1, torchvision 0.29.1, timm 1.0.31)")'
else
  pip_ install -q --upgrade pip wheel
  pip_ install -q torch==2.14.1 torchvision==0.29.1
  pip_ install -q -e '.[dev]'
fi

if [ "${DAP_NO_MM:-0}" = 1 ]; then
  echo "installed (no mm stack): $VENV"; exit 0
fi

# Offline, the mm packages go in without their declared requirements, and those are named here instead: a
# wheelhouse need not carry what the system already has under another name (opencv-python-headless for mmengine's
# opencv-python, say).
nodeps=() mm_deps=()
if [ "$offline" = 1 ]; then
  nodeps=(--no-deps)
  mm_deps=(addict matplotlib numpy pyyaml rich termcolor yapf scipy shapely six terminaltables tqdm packaging pillow)
fi
pip_ install -q "${nodeps[@]}" mmengine==0.10.7
pip_ install -q pycocotools json_tricks munkres "${mm_deps[@]}"
if { [ "${FORCE_CUDA:-0}" = 1 ] || [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; } && [ -z "${DAP_CUDA_ARCH:-}" ]; then
  echo "note: install.sh ignores FORCE_CUDA/TORCH_CUDA_ARCH_LIST; name architectures with DAP_CUDA_ARCH=9.0" >&2
fi
plan=$("$VENV/bin/python" tools/mmcv_wheel.py plan)  # one line and exit 2 on a bad DAP_CUDA_ARCH
eval "$plan"  # MMCV_KEY (cache folder), MMCV_ARCH (TORCH_CUDA_ARCH_LIST; empty: CPU ops), MMCV_WHY
echo "mmcv 2.1.0: $MMCV_WHY"
dest="$WHEELS/$MMCV_KEY"
# .mmcv-key: a CPU mmcv imports fine on a GPU machine, so "import mmcv.ops" alone cannot tell the builds apart
if [ "$(cat "$VENV/.mmcv-key" 2>/dev/null)" != "$MMCV_KEY" ] || ! "$VENV/bin/python" -c 'import mmcv.ops' 2>/dev/null
then
  if ! ls "$dest"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
    [ "$offline" = 0 ] || fail "no mmcv wheel $dest/mmcv-2.1.0-*.whl and no package registry (DAP_WHEELHOUSE):" \
      "build it where there is one (same Python and torch; DAP_CUDA_ARCH=... for CUDA ops) and copy $dest here"
    pip_ install -q 'setuptools<70'  # mmcv's setup.py imports pkg_resources (gone in setuptools 70+)
    echo "building mmcv 2.1.0 into $dest (CPU ops: about 20 minutes on 2 cores; CUDA ops: far longer; once)"
    src=$(mktemp -d)
    pip_ download -q --no-deps --no-build-isolation --no-binary :all: mmcv==2.1.0 -d "$src"
    tar -xzf "$src"/mmcv-2.1.0.tar.gz -C "$src"
    # torch 2.14's headers need C++20; mmcv 2.1.0 hard-codes c++14/c++17.
    sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$src/mmcv-2.1.0/setup.py"
    mkdir -p "$dest"
    (
      # mmcv's setup.py builds CUDA ops when FORCE_CUDA=1 or torch sees a GPU: set both switches from the plan.
      if [ -n "$MMCV_ARCH" ]; then
        toolkit=$("$VENV/bin/python" tools/mmcv_wheel.py toolkit --shim "$src/lib")  # may pip-install nvcc
        eval "$toolkit"  # export CUDA_HOME, CPATH, LIBRARY_PATH
        export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$MMCV_ARCH"
      else
        export FORCE_CUDA=0
        unset TORCH_CUDA_ARCH_LIST
      fi
      # -g0: no host debug info (the wheel travels to GPU machines; the .so shrinks and links faster).
      # --no-build-isolation: otherwise pip builds against a fresh torch-less env and silently drops the ops.
      cd "$src/mmcv-2.1.0" && CFLAGS="${CFLAGS:-} -g0" MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} \
        pip_ wheel -q --no-build-isolation --no-deps -w "$dest" .
    )
    rm -rf "$src"
  fi
  pip_ install -q --no-deps --force-reinstall "$dest"/mmcv-2.1.0-*.whl
  echo "$MMCV_KEY" >"$VENV/.mmcv-key"
  pip_ install -q addict yapf
  "$VENV/bin/python" -c 'import cv2' 2>/dev/null || pip_ install -q opencv-python-headless
fi
pip_ install -q "${nodeps[@]}" mmdet==3.3.0
# mmpose's chumpy requirement does not build and is never imported; xtcocotools' wheel breaks on numpy 2.
pip_ install -q --no-deps mmpose==1.3.2
# xtcocotools 1.14.3 is built from its sdist, with numpy 2's name for the flag its _mask.pyx sets (np.NPY_OWNDATA is
# gone; pycocotools made the same change): unpatched, its mask functions (iou, decode, toBbox) raise AttributeError.
# The wheel is cached like mmcv's, per Python and numpy major version.
xtc_check='import numpy as np; from xtcocotools import mask; mask.toBbox(mask.encode(np.ones((2, 2, 1), np.uint8, "F")))'
if ! "$VENV/bin/python" -c "$xtc_check" 2>/dev/null; then
  xtc_key=$("$VENV/bin/python" -c 'import sys, numpy
print("xtcocotools-1.14.3-cp%d%d-np%s-owndata" % (*sys.version_info[:2], numpy.__version__.split(".")[0]))')
  xtc_dest="$WHEELS/$xtc_key"
  if ! ls "$xtc_dest"/xtcocotools-1.14.3-*.whl >/dev/null 2>&1; then
    pip_ install -q cython
    src=$(mktemp -d)
    pip_ download -q --no-deps --no-build-isolation --no-binary :all: xtcocotools==1.14.3 -d "$src" \
      || fail "no xtcocotools wheel in $xtc_dest and no sdist to build one; copy $xtc_dest from a machine that has it"
    tar -xzf "$src"/xtcocotools-1.14.3.tar.gz -C "$src"
    sed -i 's/np\.NPY_OWNDATA/np.NPY_ARRAY_OWNDATA/g' "$src/xtcocotools-1.14.3/xtcocotools/_mask.pyx"
    mkdir -p "$xtc_dest"
    pip_ wheel -q --no-build-isolation --no-deps -w "$xtc_dest" "$src/xtcocotools-1.14.3"
    rm -rf "$src"
  fi
  pip_ install -q --no-deps --force-reinstall "$xtc_dest"/xtcocotools-1.14.3-*.whl
fi
# mmpretrain (pure Python) for tools/pretrain_mm.sh, without deps: its metadata names model-index as 'modelindex'
# (the module's name); the packages it imports are installed explicitly.
pip_ install -q --no-deps mmpretrain==1.2.0
pip_ install -q einops importlib-metadata mat4py model-index rich
# torch 2.14 requires setuptools>=77.0.3; mmengine 0.10.7 resolves 'mmdet::'/'mmpose::' config bases through
# pkg_resources, which setuptools 81 removed. (The mmcv build above pins <70 only while it builds.)
pip_ install -q 'setuptools>=77.0.3,<81'
"$VENV/bin/python" -c 'import mmcv.ops, mmdet, mmpose, mmpretrain
print("mm stack ok:", *(f"{m.__name__} {m.__version__}" for m in (mmcv, mmdet, mmpose, mmpretrain)))'
echo "installed: $VENV"
