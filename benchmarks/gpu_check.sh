#!/usr/bin/env bash
# GPU check for one NVIDIA H100/H200 with no internet, its own torch + timm, no mmcv; under 8 minutes.
# Run from the repo root:  bash benchmarks/gpu_check.sh [--data DIR] [--imagenet DIR] [--dry-run] [...]
# Installs nothing: the repo is put on PYTHONPATH. Data: --data (CIFAR-10 tarballs) and --imagenet default to
# ../shared/data/{cifar10,imagenet_sample}, then shared/data/...; JSON results go to $OUT (else ./gpu_results).
# The summary table is printed last. See benchmarks/gpu_check.py for what is measured.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# one interpreter start (about 4 s on cpu-2) both checks the imports and reads the versions printed below
probe="import torch, timm, yaml; print(f'torch {torch.__version__}, timm {timm.__version__}, cuda {torch.version.cuda}')"
if ! versions=$("$PY" -c "$probe" 2>/dev/null); then
    echo "error: $PY cannot import torch, timm and yaml; set PYTHON to an interpreter that has them" >&2
    exit 2
fi
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ "$dry" = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        || { echo "error: nvidia-smi failed: no NVIDIA GPU here (use --dry-run on a CPU)" >&2; exit 2; }
fi
echo "$versions"
exec "$PY" benchmarks/gpu_check.py "$@"
