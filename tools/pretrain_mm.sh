#!/usr/bin/env bash
# DaP pretraining with mmengine/mmpretrain: an mm config (configs/mmpretrain/*.py) with a `dap` block.
# Writes WORK_DIR/run.json and summary.csv in the format of tools/pretrain.sh, plus mmengine's checkpoints and logs.
#
#   tools/pretrain_mm.sh CONFIG [--data-root DIR] [--work-dir DIR] [--resume [CKPT]] [--cfg-options k=v ...]
#   tools/pretrain_mm.sh configs/mmpretrain/resnet50_dap75_in1k.py --data-root /data/imagenet   # DIR/{train,val}/CLASS/
#   tools/pretrain_mm.sh CONFIG --data-root DIR --cfg-options dap.keep=0.5 dap.warmup=1 dap.reuse=[]
#   NPROC_PER_NODE=8 tools/pretrain_mm.sh CONFIG --data-root DIR       # DDP on one node (torchrun)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 tools/pretrain_mm.sh CONFIG ...   # node 0 of 2
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${DAP_PYTHON:-"$root/.venv/bin/python"}  # DAP_PYTHON: another interpreter (used as given)
[ -n "${DAP_PYTHON:-}" ] || [ -x "$py" ] || py=python3  # no .venv: the python on PATH
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
source "$root/tools/launch_counts.sh"  # nproc, nnodes: whole numbers, or one line and exit 2
if [ "$nproc" -gt 1 ] || [ "$nnodes" -gt 1 ]; then
  # on one node, the checks made before the runner is built, once in one process: such bad input is one line and
  # exit 2, not one line per process, torchrun's ChildFailedError report and exit 1 (not with several nodes:
  # node 0 refusing alone would leave the others in torchrun's rendezvous until its timeout)
  if [ "$nnodes" = 1 ]; then
    "$py" -m dap_pretrain.mm.train "$@" --check > /dev/null || exit $?
  fi
  exec "$py" -m torch.distributed.run --nproc_per_node "$nproc" --nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m dap_pretrain.mm.train --launcher pytorch "$@"
fi
exec "$py" -m dap_pretrain.mm.train "$@"
