#!/usr/bin/env bash
# End-to-end smoke benchmark of the product on CPU: pretrain two ResNet-50 backbones (all data, and DaP at 75%
# compute) on 16 real ImageNet classes at 64 px, export them, fine-tune + COCO-evaluate all three transfer tasks
# on ../shared/data/coco_mini (shrunk schedules: a few iterations, 400x240 detection inputs), and print the
# paper's Tables 8 and 9 with seconds per iteration. The APs of such short runs are near zero: this measures that
# everything runs and what an iteration costs, not the paper's transfer claim (that needs full ImageNet + COCO).
#
#   bash benchmarks/coco_mini_transfer.sh [WORK_DIR]     # default /tmp/dap_coco_mini; ~10 min on 2 idle cores
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py="$root/.venv/bin/python"
shared="$root/../shared/data"
work=${1:-/tmp/dap_coco_mini}
mkdir -p "$work/imagenet16/train" "$work/imagenet16/val"
for c in $(ls "$shared/imagenet_sample" | head -16); do
  for s in train val; do ln -sfn "$shared/imagenet_sample/$c" "$work/imagenet16/$s/$c"; done
done
pre=(--model resnet50 --data-dir "$work/imagenet16" --aug imagenet --img-size 64 -b 8 --epochs 2 --decay-milestones 1
     --no-plot --overwrite)
"$py" -m dap_pretrain.train "${pre[@]}" --dap-select none --output "$work/pretrain_full"
"$py" -m dap_pretrain.train "${pre[@]}" --dap-warmup 0 --dap-interval 1 --dap-keep 0.5 --dap-reuse \
  --output "$work/pretrain_dap"
for r in full dap; do "$py" -m dap_pretrain export "$work/pretrain_$r/last.pth.tar" --out "$work/r50_$r" --overwrite; done

nw=(); for s in train val test; do nw+=("${s}_dataloader.num_workers=0" "${s}_dataloader.persistent_workers=False"); done
short=(train_cfg.max_epochs=1 train_cfg.val_begin=2 default_hooks.logger.interval=1)
det=(train_dataloader.dataset.indices=16 "train_dataloader.dataset.pipeline.2.scale=(400,240)"
     "test_dataloader.dataset.pipeline.1.scale=(400,240)" model.test_cfg.rcnn.score_thr=0.0)
pose=(train_dataloader.dataset.indices=32 train_dataloader.batch_size=8 test_dataloader.batch_size=16)
for r in full dap; do
  for task in faster_rcnn mask_rcnn simplebaseline; do
    opts=("${nw[@]}" "${short[@]}"); [ "$task" = simplebaseline ] && opts+=("${pose[@]}") || opts+=("${det[@]}")
    start=$(date +%s)
    bash "$root/tools/transfer_coco.sh" "$task" "$work/r50_$r" --data-root "$shared/coco_mini" \
      --work-dir "$work/$task/$r" --overwrite --cfg-options "${opts[@]}" > "$work/$task-$r.log" 2>&1
    "$py" -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], 'train s/iter',
              round(m['run']['train_sec_per_iter'], 2), 'total s', sys.argv[4])" \
      "$work/$task/$r/metrics.json" "$task" "$r" "$(( $(date +%s) - start ))"
  done
done
"$py" -m downstream.report "$work"/faster_rcnn/* "$work"/mask_rcnn/*
"$py" -m downstream.report "$work"/simplebaseline/*
