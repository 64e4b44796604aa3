#!/usr/bin/env bash
# tools/install.sh on a GPU machine that reaches no package registry, then the COCO transfer from the .venv it made
# (issue 12: "after tools/install.sh"). One job, a summary line per step in $OUT/summary.txt as it goes.
#
#   bash benchmarks/gpu_offline_install.sh [WHEELHOUSE]      # default .whl
#   DRY_RUN=1 PYTHON=... bash benchmarks/gpu_offline_install.sh DIR   # CPU rehearsal (gpu_transfer.sh's dry run)
#
# WHEELHOUSE: the wheels pip may install (DAP_WHEELHOUSE), with cache/<key>/ holding the prebuilt mmcv and
# xtcocotools wheels (DAP_WHEEL_CACHE). The machine's own torch, torchvision and timm are kept (DAP_SYSTEM_TORCH=1);
# PYTHON (default python3) is the interpreter that has them. The backbone is a randomly initialised timm ResNet-50
# (the trainer-to-export path was proven on the GPU before; docs/TRANSFER.md). ITERS (default 10) iterations per
# task, BUDGET_S (default 150) for the transfer part, no torchrun run; INSTALL_S (default 300) caps the install, which
# runs with DAP_INSTALL_TRACE=1 (each command timed in $OUT/install.log).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
wh=${1:-.whl}
OUT=${OUT:-$PWD/gpu_results/offline_install}
mkdir -p "$OUT"
summary=$OUT/summary.txt
start=$SECONDS
PYTHON=${PYTHON:-python3} DAP_SYSTEM_TORCH=1 DAP_WHEELHOUSE=$wh DAP_WHEEL_CACHE=$wh/cache DAP_INSTALL_TRACE=${DAP_INSTALL_TRACE:-1} \
  timeout -k 5 "${INSTALL_S:-300}" bash tools/install.sh >"$OUT/install.log" 2>&1
rc=$?
# the install's own lines (a traced multi-line command continues on lines without the '+ ' mark)
# (pip's "dependency resolver" ERROR lines are its notices about --no-deps installs, e.g. opencv-python for mmengine
# where opencv-python-headless provides cv2: left out)
facts=$(grep -E '^(kept the system|mmcv 2\.1\.0:|mm stack ok|installed:|install\.sh: error|ERROR)' "$OUT/install.log" |
  grep -v "^ERROR: pip's dependency resolver" | tr '\n' ' ')
echo "install.sh (DAP_WHEELHOUSE=$wh, DAP_SYSTEM_TORCH=1): exit $rc in $((SECONDS - start)) s | $facts" | tee -a "$summary"
[ "$rc" = 0 ] || { tail -n 20 "$OUT/install.log"; exit 1; }
timeout 60 .venv/bin/python -c 'import timm, torch
torch.save(timm.create_model("resnet50").state_dict(), "/tmp/dap_r50_random.pth")' || exit 1
OUT=$OUT DAP_PYTHON=$PWD/.venv/bin/python TORCHRUN=0 ITERS=${ITERS:-10} BUDGET_S=${BUDGET_S:-150} \
  bash benchmarks/gpu_transfer.sh --no-wheels --backbone /tmp/dap_r50_random.pth --model resnet50
