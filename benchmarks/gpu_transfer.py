"""Helpers of ``benchmarks/gpu_transfer.sh``: the CUDA-ops check, one summary row per transfer run, and the
GPU-hours estimate of the paper's Table 8/9 runs from the measured seconds per iteration.

    python benchmarks/gpu_transfer.py check --device cuda        # mm stack imports, mmcv nms/RoIAlign on the device
    python benchmarks/gpu_transfer.py row NAME METRICS_JSON WALL_S EXIT_CODE
    python benchmarks/gpu_transfer.py estimate METRICS_JSON [...]

Only ``check`` imports torch and the mm stack; ``row`` and ``estimate`` read ``metrics.json`` files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# The paper's schedules (Section 4.4), run as mmdet's / mmpose's stock configs on 8 GPUs:
# mmdet 1x: 12 epochs over COCO train2017's 117,266 images with annotations (filter_empty_gt) at 8 GPUs x 2 images.
DET_GPUS, DET_BATCH_PER_GPU = 8, 2
DET_ITERS = 12 * math.ceil(117_266 / (DET_GPUS * DET_BATCH_PER_GPU))  # 12 x 7,330 = 87,960 (the "90k" of 1x)
# SimpleBaseline 256x192: 210 epochs over train2017's 149,813 person instances with keypoints at 8 GPUs x 64.
POSE_GPUS, POSE_BATCH_PER_GPU = 8, 64
POSE_ITERS = 210 * math.ceil(149_813 / (POSE_GPUS * POSE_BATCH_PER_GPU))  # 210 x 293 = 61,530
# Rows of the paper's tables per task: pre-train compute 100% / 75% / 86%.
PAPER_ROWS = {
    "faster_rcnn": ("Table 8 FPN ResNet-50", 3),
    "mask_rcnn": ("Table 8 Mask R-CNN ResNet-50", 3),
    "simplebaseline": ("Table 9 SimpleBaseline ResNet-50", 3),
}
SCHEDULES = {
    "faster_rcnn": (DET_ITERS, DET_GPUS, DET_BATCH_PER_GPU),
    "mask_rcnn": (DET_ITERS, DET_GPUS, DET_BATCH_PER_GPU),
    "simplebaseline": (POSE_ITERS, POSE_GPUS, POSE_BATCH_PER_GPU),
}
COLUMNS = {
    8: [("AP", "bbox_mAP"), ("AP50", "bbox_mAP_50"), ("AP_S", "bbox_mAP_s"), ("AP_M", "bbox_mAP_m")]
    + [("AP_L", "bbox_mAP_l"), ("APm", "segm_mAP"), ("APm_S", "segm_mAP_s")],
    9: [("APkp", "AP"), ("APkp50", "AP .5"), ("APkp_M", "AP (M)"), ("APkp_L", "AP (L)"), ("ARkp", "AR")],
}


def check(device: str) -> str:
    """Imports the mm stack and runs mmcv's nms and RoIAlign on ``device``; returns one line of versions.

    Raises:
        RuntimeError: no CUDA device although one was asked for, or an op that gives a wrong answer.
    """
    import mmcv
    import mmdet
    import mmengine
    import mmpose
    import pycocotools  # noqa: F401  (mmdet's COCO evaluator)
    import torch
    import xtcocotools  # noqa: F401  (mmpose's COCO evaluator)
    from mmcv.ops import RoIAlign, get_compiler_version, get_compiling_cuda_version, nms

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32, device=device)
    dets, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7], device=device), iou_threshold=0.5)
    if keep.tolist() != [0, 2] or dets.device.type != device:
        raise RuntimeError(f"mmcv nms on {device} kept {keep.tolist()} (want [0, 2]) on {dets.device}")
    feats = torch.arange(16.0, device=device).reshape(1, 1, 4, 4)
    rois = torch.tensor([[0, 0, 0, 4, 4]], dtype=torch.float32, device=device)
    pooled = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=False)(feats, rois)
    if pooled.shape != (1, 1, 2, 2) or not torch.isfinite(pooled).all():
        raise RuntimeError(f"mmcv RoIAlign on {device} returned {pooled}")
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return (
        f"ops ok on {name}: torch {torch.__version__} (CUDA {torch.version.cuda}), mmcv {mmcv.__version__} "
        f"(ops built with CUDA {get_compiling_cuda_version()}, {get_compiler_version()}; from "
        f"{Path(mmcv.__file__).parent.parent}), mmengine {mmengine.__version__}, mmdet {mmdet.__version__}, "
        f"mmpose {mmpose.__version__}"
    )


def _load(path: str | Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def row(name: str, metrics_json: str | Path, wall_s: float, exit_code: int) -> str:
    """One summary line: task, s/iter (and its wait for data), AP columns (percent), device, wall time, exit code."""
    m = _load(metrics_json)
    if m is None:
        return f"{name}: no metrics.json | wall {wall_s:.0f} s | exit {exit_code}"
    run = m["run"]
    cols = " ".join(f"{label} {100 * m[f'coco/{key}']:.2f}" for label, key in COLUMNS[m["table"]] if f"coco/{key}" in m)
    note = f" | note: {m['note']}" if m.get("note") else ""
    launch = "torchrun" if run.get("launcher") == "pytorch" else "plain"
    return (
        f"{name}: {m['task']} {launch} x{run['world_size']} | {run['train_sec_per_iter']:.3f} s/iter "
        f"({run['train_data_sec_per_iter']:.3f} waiting for data) over {run['train_iters']} iters at batch "
        f"{run['train_batch_size_per_gpu']}/GPU | {cols}{note} | {run['device']} | wall {wall_s:.0f} s "
        f"| exit {exit_code}"
    )


def gpu_hours(task: str, sec_per_iter: float) -> float:
    """GPU-hours of one stock run of ``task`` = s/iter x iterations x GPUs / 3600 (see :func:`estimate`)."""
    iters, gpus, _ = SCHEDULES[task]
    return sec_per_iter * iters * gpus / 3600


def estimate(metrics: list[dict]) -> list[str]:
    """The GPU-hours of the paper's Table 8/9 runs from the plain (not torchrun) runs' s/iter, with the formula.

    Only runs at the stock per-GPU batch count; the input size is not in ``metrics.json``, so a run at a
    reduced size (the script's dry run) must not be passed off as one at the stock size.
    """
    lines = [
        "GPU-hours of the paper's runs = s/iter (one GPU, stock per-GPU batch) x iterations x 8 GPUs / 3600",
        f"  1x detection: {DET_ITERS:,} iterations = 12 epochs x ceil(117,266 train2017 images / (8 GPUs x 2))",
        f"  SimpleBaseline: {POSE_ITERS:,} iterations = 210 epochs x ceil(149,813 person instances / (8 GPUs x 64))",
        "  assumes: each of the 8 GPUs runs at the one-GPU s/iter (no all-reduce or loader contention), the same GPU",
        "  and loader (stock 2 workers per GPU), fp32 as the stock configs; training only (validation every epoch /",
        "  every 10 epochs and the final test are extra); s/iter from a short run (first iteration left out)",
    ]
    seen: dict[str, float] = {}
    off_batch: dict[str, int] = {}
    for m in metrics:
        task, run = m.get("task"), m.get("run", {})
        if run.get("launcher") != "none" or task not in SCHEDULES or task in seen:
            continue
        if run.get("train_batch_size_per_gpu") == SCHEDULES[task][2]:
            seen[task] = run["train_sec_per_iter"]
        else:
            off_batch[task] = run.get("train_batch_size_per_gpu")
    total = 0.0
    for task, (label, n_rows) in PAPER_ROWS.items():
        if task in off_batch:
            stock = SCHEDULES[task][2]
            lines.append(f"  {label}: not measured (ran at batch {off_batch[task]}, not the stock {stock})")
            continue
        if task not in seen:
            lines.append(f"  {label}: not measured")
            continue
        per_run = gpu_hours(task, seen[task])
        total += n_rows * per_run
        lines.append(f"  {label}: {seen[task]:.3f} s/iter -> {per_run:.1f} GPU-h per run x {n_rows} rows")
    lines.append(f"  total of the rows above: {total:.1f} GPU-h")
    if "simplebaseline" in seen:
        lines.append(
            f"  Table 9 SimpleBaseline ResNet-101 (3 rows): not measured; more than the ResNet-50 "
            f"{gpu_hours('simplebaseline', seen['simplebaseline']):.1f} GPU-h per run"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    r = sub.add_parser("row")
    r.add_argument("name")
    r.add_argument("metrics_json")
    r.add_argument("wall_s", type=float)
    r.add_argument("exit_code", type=int)
    e = sub.add_parser("estimate")
    e.add_argument("metrics_json", nargs="*")
    args = p.parse_args(argv)
    if args.cmd == "check":
        try:
            print(check(args.device))
        except (ImportError, RuntimeError) as err:
            print(f"check failed: {type(err).__name__}: {err}")
            return 1
    elif args.cmd == "row":
        print(row(args.name, args.metrics_json, args.wall_s, args.exit_code))
    else:
        print("\n".join(estimate([m for m in map(_load, args.metrics_json) if m is not None])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
