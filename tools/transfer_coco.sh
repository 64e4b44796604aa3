#!/usr/bin/env bash
# Fine-tune + COCO-evaluate a DaP backbone; writes WORK_DIR/metrics.json (see docs/TRANSFER.md).
#
#   tools/transfer_coco.sh TASK BACKBONE [--data-root DIR] [--work-dir DIR] [--gpus N] [--cfg-options k=v ...]
#
# TASK: faster_rcnn | mask_rcnn | simplebaseline. BACKBONE: export folder or .pth (+ --model NAME).
# Other options (--person-dets FILE, --overwrite, --model NAME) go to `python -m downstream.transfer`.
# Without --gpus: one plain process (mmengine uses the GPU when torch sees one, else the CPU).
# --gpus N (N >= 1, also 1): N processes through torchrun with mmengine's launcher='pytorch', one per GPU.
# DAP_PYTHON: the interpreter (default .venv/bin/python); MASTER_PORT: torchrun's port (default 29500).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${DAP_PYTHON:-"$ROOT/.venv/bin/python"}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

gpus="" args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus)
      if [ $# -lt 2 ] || { [[ "$2" == -* ]] && ! [[ "$2" =~ ^-[0-9] ]]; }; then  # -1 is a value (refused below)
        echo "transfer_coco: error: --gpus needs a number; pass e.g. --gpus 8" >&2; exit 2
      fi
      gpus="$2"; shift 2 ;;
    --gpus=*) gpus="${1#--gpus=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -z "$gpus" ]; then
  exec "$PY" -m downstream.transfer "${args[@]}"
fi
if ! [[ "$gpus" =~ ^[1-9][0-9]*$ ]]; then
  fix="pass e.g. --gpus 8"; [[ "$gpus" =~ ^0+$ ]] && fix="drop --gpus to run one process (on the CPU without a GPU)"
  echo "transfer_coco: error: --gpus $gpus is not a positive integer; $fix" >&2; exit 2
fi
# mmengine's 'pytorch' launcher binds one CUDA device per process: refuse early instead of N tracebacks
have=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$have" -lt "$gpus" ]; then
  if [ "$have" -eq 0 ]; then fix="drop --gpus to run one process on the CPU"; else fix="pass --gpus $have or fewer"; fi
  echo "transfer_coco: error: --gpus $gpus but torch sees $have CUDA device(s); $fix" \
    "(--gpus N starts N processes through torchrun, one per GPU)" >&2
  exit 2
fi
# Every input is checked once here: a bad one is then one line and exit 2, not one error per rank followed by
# torchrun's ChildFailedError report and exit 1.
"$PY" -m downstream.transfer "${args[@]}" --check >/dev/null
exec "$PY" -m torch.distributed.run --nproc_per_node="$gpus" --master_port="${MASTER_PORT:-29500}" \
  -m downstream.transfer "${args[@]}" --launcher pytorch
