#!/usr/bin/env bash
# One GPU job of the paper's Table 2(f) at 300 epochs (benchmarks/paper_tables.py): one NVIDIA H100/H200, offline,
# its own torch + timm. Run from the repo root, e.g.
#   DAP_GIT_COMMIT=<sha> bash benchmarks/paper_tables.sh --jobs 6 --budget-s 480 \
#       --state-in benchmarks/state/table2f_e300 --state-out $OUT
# (omit --state-in on the sweep's first job). Installs nothing: the repo is put on PYTHONPATH. Data: --data, else
# ../shared/data/cifar10, then shared/data/cifar10. --state-out defaults to $OUT (else ./gpu_results/paper_tables):
# it receives paper_state_NN.tar.gz (unfinished runs), paper_tables.json and a copy of the results CSV, 8 files at most.
# The python call is killed 60 s after --budget-s (the sweep itself stops its trainers at the budget); the job's
# summary table is printed last.
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
dry=0 budget=480 state_out=0 prev=""
for a in "$@"; do
    case "$a" in
        --dry-run) dry=1 ;;
        --budget-s=*) budget="${a#--budget-s=}" ;;
        --state-out|--state-out=*) state_out=1 ;;
    esac
    [ "$prev" = "--budget-s" ] && budget="$a"
    prev="$a"
done
if ! [[ "$budget" =~ ^[0-9]+([.][0-9]*)?$ ]]; then
    echo "error: --budget-s $budget is not a number of seconds" >&2
    exit 2
fi
if [ "$dry" = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        || { echo "error: nvidia-smi failed: no NVIDIA GPU here (use --dry-run on a CPU)" >&2; exit 2; }
fi
extra=()
if [ "$state_out" = 0 ]; then
    extra=(--state-out "${OUT:-gpu_results/paper_tables}")
fi
if [ "$dry" = 0 ] && [ -z "${DAP_GIT_COMMIT:-}" ]; then
    echo "warning: DAP_GIT_COMMIT is unset: the CSV's commit column comes from this copy's .git, which may be stale" >&2
fi
echo "$versions"
limit=$(( ${budget%.*} + 60 ))
exec timeout -k 15 "$limit" "$PY" benchmarks/paper_tables.py "$@" "${extra[@]}"
