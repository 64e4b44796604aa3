#!/usr/bin/env bash
# Fine-tune + COCO-evaluate a DaP backbone; writes WORK_DIR/metrics.json (see docs/TRANSFER.md).
#
#   tools/transfer_coco.sh TASK BACKBONE [--data-root DIR] [--work-dir DIR] [--gpus N] [--cfg-options k=v ...]
#
# TASK: faster_rcnn | mask_rcnn | simplebaseline. BACKBONE: export folder or .pth (+ --model NAME).
# Other options (--person-dets FILE, --overwrite, --model NAME) go to `python -m downstream.transfer`.
# --gpus N > 1 runs N processes through torchrun with mmengine's launcher='pytorch'.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${DAP_PYTHON:-"$ROOT/.venv/bin/python"}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

gpus=1 args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus="${2:?--gpus needs a number}"; shift 2 ;;
    --gpus=*) gpus="${1#--gpus=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if ! [[ "$gpus" =~ ^[1-9][0-9]*$ ]]; then
  echo "transfer_coco: error: --gpus $gpus is not a positive integer; pass e.g. --gpus 8" >&2; exit 2
fi

if [ "$gpus" -gt 1 ]; then
  # mmengine's 'pytorch' launcher binds one CUDA device per process: refuse early instead of N tracebacks
  have=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  if [ "$have" -lt "$gpus" ]; then
    echo "transfer_coco: error: --gpus $gpus but torch sees $have CUDA device(s); pass --gpus $(( have > 1 ? have : 1 ))" \
      "(one process per GPU; --gpus 1 runs on one GPU or the CPU)" >&2
    exit 2
  fi
  exec "$PY" -m torch.distributed.run --nproc_per_node="$gpus" --master_port="${MASTER_PORT:-29500}" \
    -m downstream.transfer "${args[@]}" --launcher pytorch
fi
exec "$PY" -m downstream.transfer "${args[@]}"
