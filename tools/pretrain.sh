#!/usr/bin/env bash
# DaP pretraining. With no arguments: the embedded default (CIFAR ResNet-20 on a CIFAR-10 subset
# shipped in the repo, CPU, a few minutes; configs/pretrain/embedded_cifar10.yaml). Flags override that config's
# values as long as the run stays on the embedded data (--model cifar_resnet56: the embedded default with another
# network); a run given --config or its own --data-dir does not read it, and gets the trainer's defaults (the
# paper's ImageNet recipe) for what it leaves out.
#
#   tools/pretrain.sh                                   # embedded default
#   tools/pretrain.sh --compare                         # ... plus a full-data baseline
#   tools/pretrain.sh --epochs 6 --dap-keep 0.5         # the embedded default, changed
#   tools/pretrain.sh --config configs/pretrain/imagenet/resnet50_dap75.yaml --data-dir /data/imagenet
#   NPROC_PER_NODE=8 tools/pretrain.sh --config ...     # DDP on one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 tools/pretrain.sh --config ...   # node 0 of 2
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${DAP_PYTHON:-"$root/.venv/bin/python"}  # DAP_PYTHON: another interpreter (used as given)
[ -n "${DAP_PYTHON:-}" ] || [ -x "$py" ] || py=python3  # no .venv: the python on PATH
args=("$@")
own_run=0 prev=""
for a in "$@"; do
  case "$a" in
    -c|--config|--config=*) own_run=1 ;;
    -h|--help) exec "$py" -m dap_pretrain.train --help ;;  # once, not from every process
    --data-dir=embedded) ;;
    --data-dir=*) own_run=1 ;;
  esac
  if [ "$prev" = --data-dir ] && [ "$a" != embedded ]; then own_run=1; fi
  prev=$a
done
[ "$own_run" = 1 ] || args=(--config "$root/configs/pretrain/embedded_cifar10.yaml" "${args[@]}")
source "$root/tools/launch_counts.sh"  # nproc, nnodes: whole numbers, or one line and exit 2
if [ "$nproc" -gt 1 ] || [ "$nnodes" -gt 1 ]; then
  # On one node, every input is checked once, in one process, before torchrun starts them: a bad one is then one
  # line and exit 2, not one line per process, torchrun's ChildFailedError report and exit 1. Not with several
  # nodes: node 0 refusing alone would leave the others in torchrun's rendezvous until its timeout, where now every
  # process stops with rank 0's line.
  if [ "$nnodes" = 1 ]; then
    "$py" -m dap_pretrain.train "${args[@]}" --check "$nproc" > /dev/null || exit $?
  fi
  exec "$py" -m torch.distributed.run --nproc_per_node "$nproc" --nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" -m dap_pretrain.train "${args[@]}"
fi
exec "$py" -m dap_pretrain.train "${args[@]}"
