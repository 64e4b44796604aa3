#!/usr/bin/env bash
# One-command install: creates .venv in the repo root with torch, timm, this project and the
# mm stack (mmengine, mmcv built once into a wheel cache, mmdet, mmpose, mmpretrain).
#
#   bash tools/install.sh            # everything (first run builds mmcv: ~20 min on 2 cores)
#   DAP_NO_MM=1 bash tools/install.sh  # timm pretraining only, no mmdet/mmpose/mmpretrain
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

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip wheel
"$PIP" install -q torch==2.14.1 torchvision==0.29.1
"$PIP" install -q -e '.[dev]'

if [ "${DAP_NO_MM:-0}" = 1 ]; then
  echo "installed (no mm stack): $VENV"; exit 0
fi

"$PIP" install -q mmengine==0.10.7 pycocotools cython json_tricks munkres
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
    "$PIP" install -q 'setuptools<70'  # mmcv's setup.py imports pkg_resources (gone in setuptools 70+)
    echo "building mmcv 2.1.0 into $dest (CPU ops: about 20 minutes on 2 cores; CUDA ops: far longer; once)"
    src=$(mktemp -d)
    "$PIP" download -q --no-deps --no-build-isolation --no-binary :all: mmcv==2.1.0 -d "$src"
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
        "$PIP" wheel -q --no-build-isolation --no-deps -w "$dest" .
    )
    rm -rf "$src"
  fi
  "$PIP" install -q --no-deps --force-reinstall "$dest"/mmcv-2.1.0-*.whl
  echo "$MMCV_KEY" >"$VENV/.mmcv-key"
  "$PIP" install -q addict yapf opencv-python-headless
fi
"$PIP" install -q mmdet==3.3.0
# mmpose's chumpy requirement does not build and is never imported; xtcocotools' wheel breaks on numpy 2.
"$PIP" install -q --no-deps mmpose==1.3.2
# xtcocotools 1.14.3 is built from its sdist, with numpy 2's name for the flag its _mask.pyx sets (np.NPY_OWNDATA is
# gone; pycocotools made the same change): unpatched, its mask functions (iou, decode, toBbox) raise AttributeError.
xtc_check='import numpy as np; from xtcocotools import mask; mask.toBbox(mask.encode(np.ones((2, 2, 1), np.uint8, "F")))'
if ! "$VENV/bin/python" -c "$xtc_check" 2>/dev/null; then
  src=$(mktemp -d)
  "$PIP" download -q --no-deps --no-build-isolation --no-binary :all: xtcocotools==1.14.3 -d "$src"
  tar -xzf "$src"/xtcocotools-1.14.3.tar.gz -C "$src"
  sed -i 's/np\.NPY_OWNDATA/np.NPY_ARRAY_OWNDATA/g' "$src/xtcocotools-1.14.3/xtcocotools/_mask.pyx"
  "$PIP" install -q --no-build-isolation --no-deps --force-reinstall "$src/xtcocotools-1.14.3"
  rm -rf "$src"
fi
# mmpretrain (pure Python) for tools/pretrain_mm.sh, without deps: its metadata names model-index as 'modelindex'
# (the module's name); the packages it imports are installed explicitly.
"$PIP" install -q --no-deps mmpretrain==1.2.0
"$PIP" install -q einops importlib-metadata mat4py model-index rich
# torch 2.14 requires setuptools>=77.0.3; mmengine 0.10.7 resolves 'mmdet::'/'mmpose::' config bases through
# pkg_resources, which setuptools 81 removed. (The mmcv build above pins <70 only while it builds.)
"$PIP" install -q 'setuptools>=77.0.3,<81'
"$VENV/bin/python" -c 'import mmcv.ops, mmdet, mmpose, mmpretrain
print("mm stack ok:", *(f"{m.__name__} {m.__version__}" for m in (mmcv, mmdet, mmpose, mmpretrain)))'
echo "installed: $VENV"
