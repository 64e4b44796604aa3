#!/usr/bin/env bash
# One GPU job that proves the COCO transfer on a GPU (issue 12, item 2), well inside 5 minutes on one H100:
#   (a) install the carried wheels (mmcv with CUDA ops, mmengine, mmdet, mmpose, pycocotools, xtcocotools, ...)
#   (b) check the mm stack imports and mmcv's nms / RoIAlign run on CUDA tensors
#   (c) train a ResNet-50 briefly with the real trainer on the embedded CIFAR-10 sample and export it
#   (d) faster_rcnn, mask_rcnn and simplebaseline through tools/transfer_coco.sh, as a user calls it, each for ITERS
#       iterations at the stock per-GPU settings (1333x800, batch 2; 256x192, batch 64), COCO-evaluated on the 79
#       coco_mini val images (detection with score threshold 0, so COCOeval scores real boxes and masks)
#   (e) faster_rcnn again with --gpus 1 (torchrun, mmengine launcher='pytorch')
# then the GPU-hours estimate of the paper's Table 8/9 runs (benchmarks/gpu_transfer.py estimate).
#
#   bash benchmarks/gpu_transfer.sh [--wheels DIR | --no-wheels] [--data-root DIR] [--backbone PATH [--model NAME]]
#   DRY_RUN=1 bash benchmarks/gpu_transfer.sh ...   # CPU rehearsal: no CUDA check, 2 iterations, small inputs
#
# --wheels DIR (env WHEELS; default .whl if it exists, else nothing is installed): pip installs every DIR/*.whl
#   into /tmp/site, which goes first on PYTHONPATH.
#   --no-wheels: install nothing, use what DAP_PYTHON has (e.g. .venv/bin/python after tools/install.sh).
# --data-root DIR (env DATA_ROOT): COCO layout; default shared/data/coco_mini in the repo, else
#   ../shared/data/coco_mini.
# --backbone PATH: transfer this backbone (export folder, or a state dict with --model NAME) instead of training
#   and exporting one in step (c).
# TORCHRUN=0 leaves out step (e). TASKS (space-separated) runs only these of step (d)'s three.
# DAP_PYTHON: the interpreter (default python3; DRY_RUN: .venv/bin/python). ITERS: training iterations per run
#   (default 30; DRY_RUN 2). BUDGET_S: the whole script's seconds (default 270; DRY_RUN 1200): each step's timeout
#   is its own cap or what is left, whichever is less; a step with under 10 s left is skipped.
# OUT (default ./gpu_results/transfer): summary.txt (a line per step, appended as it goes, then the estimate),
#   log.txt (each step's last lines), NAME.metrics.json per transfer run: 6 files. KEEP_WORK=1 keeps the work
#   folder (/tmp/gpu_transfer.*: full logs, checkpoints).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
dry=${DRY_RUN:-0}
wheels=${WHEELS:-} data_root=${DATA_ROOT:-} no_wheels=0 backbone="" bb_model=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
    --no-wheels) no_wheels=1; shift ;;
    --data-root) data_root=${2:?--data-root needs a folder}; shift 2 ;;
    --backbone) backbone=${2:?--backbone needs a path}; shift 2 ;;
    --model) bb_model=(--model "${2:?--model needs a timm model name}"); shift 2 ;;
    *) echo "gpu_transfer: error: unknown argument $1 (use --wheels DIR, --no-wheels, --data-root DIR," \
         "--backbone PATH, --model NAME)" >&2; exit 2 ;;
  esac
done
if [ "$no_wheels" = 1 ]; then wheels=""; elif [ -z "$wheels" ] && [ -d .whl ]; then wheels=.whl; fi
if [ -n "$backbone" ] && [ ! -e "$backbone" ]; then
  echo "gpu_transfer: error: --backbone $backbone does not exist; pass an export folder or a state dict file" >&2
  exit 2
fi
if [ -z "$data_root" ]; then
  for d in shared/data/coco_mini ../shared/data/coco_mini; do [ -d "$d" ] && data_root=$(cd "$d" && pwd) && break; done
fi
if [ ! -d "${data_root:-}/annotations" ]; then
  echo "gpu_transfer: error: no COCO data root; pass --data-root DIR" >&2; exit 2
fi
if [ "$dry" = 1 ]; then PY=${DAP_PYTHON:-$REPO/.venv/bin/python}; else PY=${DAP_PYTHON:-python3}; fi
export DAP_PYTHON=$PY PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
iters=${ITERS:-$([ "$dry" = 1 ] && echo 2 || echo 30)}
OUT=${OUT:-$REPO/gpu_results/transfer}
mkdir -p "$OUT"
work=$(mktemp -d /tmp/gpu_transfer.XXXXXX)
[ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT  # KEEP_WORK=1 keeps the logs and work dirs
budget=${BUDGET_S:-$([ "$dry" = 1 ] && echo 1200 || echo 270)}
deadline=$(( $(date +%s) + budget ))
summary=$OUT/summary.txt

say() { echo "$*" | tee -a "$summary"; }

# step NAME CAP_S CMD...: runs CMD under `timeout` (its whole process group: torchrun's workers, loader workers)
# for CAP_S or what is left of the budget; keeps the log in $work, its tail in $OUT/log.txt; sets rc and wall.
# Returns 1 (rc=124) without running CMD when under 10 s are left.
step() {
  local name=$1 cap=$2; shift 2
  local left=$(( deadline - $(date +%s) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 10 ]; then rc=124 wall=0; say "$name: skipped, ${left} s of the budget left"; return 1; fi
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" > "$work/$name.log" 2>&1
  rc=$? wall=$(( SECONDS - start ))
  local lines=8; [ "$rc" = 0 ] || lines=60
  { echo "===== $name: exit $rc after $wall s (limit $limit s)"; tail -n "$lines" "$work/$name.log"; } >> "$OUT/log.txt"
}

say "gpu_transfer $(date -u +%FT%TZ): dry_run=$dry iters=$iters data_root=$data_root python=$PY"
[ "$dry" = 1 ] || say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"

# (a) the carried wheels
if [ -n "$wheels" ]; then
  step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl
  say "install: $(ls "$wheels"/*.whl | wc -l) wheels from $wheels -> /tmp/site | wall $wall s | exit $rc"
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
else
  say "install: no --wheels folder; using what $PY has"
fi

# (b) CUDA ops
step check 90 "$PY" benchmarks/gpu_transfer.py check --device "$([ "$dry" = 1 ] && echo cpu || echo cuda)"
say "check: $(tail -n 1 "$work/check.log") | wall $wall s | exit $rc"
[ "$rc" = 0 ] || { say "stopping: the mm stack cannot run here"; exit 1; }

# (c) a backbone from the real trainer and exporter (the embedded CIFAR-10 sample is the trainer's default data)
if [ -n "$backbone" ]; then
  r50=$backbone
  say "backbone: $backbone ${bb_model[*]} (given; no training here)"
else
  r50=$work/r50
  pre=(--fixed-subset 0.05 --img-size 64 -b 64)
  [ "$dry" = 1 ] && pre=(--fixed-subset 0.002 --img-size 32 -b 16)
  step pretrain 120 "$PY" -m dap_pretrain.train --model resnet50 --data-dir embedded --epochs 1 --val-split '' \
    --no-plot --output "$work/pretrain" --overwrite "${pre[@]}"
  [ "$rc" = 0 ] && step export 60 "$PY" -m dap_pretrain export "$work/pretrain/last.pth.tar" --out "$r50"
  say "export: ResNet-50 from dap_pretrain.train ${pre[*]} -> $r50 | exit $rc"
  [ "$rc" = 0 ] || { say "stopping: no backbone"; exit 1; }
fi

# (d) + (e) the transfer runs: ITERS iterations (an iteration-based loop over an infinite sampler: no epoch ends,
# no partial batch), no validation during training, then the config's COCO test evaluator (runner.test()).
common=("train_cfg._delete_=True" train_cfg.type=IterBasedTrainLoop "train_cfg.max_iters=$iters"
        "train_cfg.val_begin=$(( iters + 1 ))" "train_cfg.val_interval=$(( iters + 1 ))"
        train_dataloader.sampler.type=InfiniteSampler log_processor.by_epoch=False default_hooks.logger.interval=10)
det=(model.test_cfg.rcnn.score_thr=0.0)
pose=()
if [ "$dry" = 1 ]; then  # CPU: small inputs and batches, fewer RoIs and test images
  det+=("train_dataloader.dataset.pipeline.2.scale=(200,120)" "test_dataloader.dataset.pipeline.1.scale=(200,120)"
        test_dataloader.dataset.indices=4 model.test_cfg.rcnn.max_per_img=20 model.train_cfg.rcnn.sampler.num=128
        model.train_cfg.rpn_proposal.max_per_img=300 model.test_cfg.rpn.max_per_img=100)
  pose+=(train_dataloader.batch_size=4 test_dataloader.dataset.indices=16 model.test_cfg.flip_test=False)
fi
metrics=()
transfer() {  # transfer NAME TASK [--gpus N]
  local name=$1 task=$2; shift 2
  local opts=("${common[@]}"); if [ "$task" = simplebaseline ]; then opts+=("${pose[@]}"); else opts+=("${det[@]}"); fi
  step "$name" 150 bash tools/transfer_coco.sh "$task" "$r50" "${bb_model[@]}" --data-root "$data_root" --work-dir "$work/$name" \
    --overwrite "$@" --cfg-options "${opts[@]}" || return
  [ -f "$work/$name/metrics.json" ] && cp "$work/$name/metrics.json" "$OUT/$name.metrics.json" \
    && metrics+=("$OUT/$name.metrics.json")
  say "$("$PY" benchmarks/gpu_transfer.py row "$name" "$work/$name/metrics.json" "$wall" "$rc")"
}
read -r -a tasks <<<"${TASKS:-faster_rcnn mask_rcnn simplebaseline}"
for task in "${tasks[@]}"; do
  case "$task" in
    faster_rcnn|mask_rcnn|simplebaseline) transfer "$task" "$task" ;;
    *) say "$task: not a task (TASKS takes faster_rcnn, mask_rcnn, simplebaseline)"; exit 2 ;;
  esac
done
if [ "${TORCHRUN:-1}" = 0 ]; then
  say "faster_rcnn_torchrun: left out (TORCHRUN=0)"
elif [ "$dry" = 1 ]; then
  name=faster_rcnn_torchrun
  step $name 30 bash tools/transfer_coco.sh faster_rcnn "$r50" "${bb_model[@]}" --data-root "$data_root" --work-dir "$work/$name" \
    --gpus 1 && say "$name (CPU: refused, exit 2 expected): $(tail -n 1 "$work/$name.log") | exit $rc"
else
  transfer faster_rcnn_torchrun faster_rcnn --gpus 1
fi

[ "$dry" = 1 ] && say "(dry run: CPU figures at reduced sizes; only the arithmetic below is meaningful)"
"$PY" benchmarks/gpu_transfer.py estimate "${metrics[@]}" | tee -a "$summary"
say "gpu_transfer done in $SECONDS s; files in $OUT"
