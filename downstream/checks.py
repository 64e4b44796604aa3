"""Pre-flight checks of the COCO inputs a config reads, run before anything is built or written.

Each check raises :class:`downstream.TransferInputError` with one line naming the problem and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from downstream import TransferInputError

_COCO_KEYS = ("images", "annotations", "categories")
_DET_KEYS = {"image_id", "category_id", "bbox", "score"}  # what mmpose reads from each detected box


def load_coco_json(path: str | Path, *, keypoints: bool = False) -> dict:
    """Loads a COCO annotation file and checks its top-level structure.

    Args:
        path: the annotation JSON.
        keypoints: also require a category with a ``keypoints`` list (person keypoints files).

    Raises:
        TransferInputError: the file is missing, not JSON, or lacks COCO's keys.
    """
    path = Path(path)
    if not path.is_file():
        raise TransferInputError(
            f"annotation file {path} not found; pass --data-root DIR with DIR/annotations/{path.name}"
        )
    try:
        ann = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TransferInputError(
            f"annotation file {path} is not valid JSON ({e}); restore the original COCO file"
        ) from None
    missing = [k for k in _COCO_KEYS if not isinstance(ann, dict) or not isinstance(ann.get(k), list)]
    if missing:
        raise TransferInputError(
            f"annotation file {path} is malformed (no {', '.join(missing)} list); restore the original COCO file"
        )
    if keypoints and not any(isinstance(c, dict) and c.get("keypoints") for c in ann["categories"]):
        raise TransferInputError(f"annotation file {path} has no keypoint category; pass person_keypoints_*.json")
    return ann


def check_images(ann: dict, *, img_dir: str | Path, ann_file: str | Path) -> None:
    """Checks that every image the annotations list is in ``img_dir``.

    Raises:
        TransferInputError: some images are absent (names the count and the first one).
    """
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise TransferInputError(f"image folder {img_dir} not found (needed by {ann_file}); check --data-root")
    present = set(os.listdir(img_dir))
    absent = [im.get("file_name") for im in ann["images"] if os.path.basename(str(im.get("file_name"))) not in present]
    if absent:
        raise TransferInputError(
            f"{len(absent)} of {len(ann['images'])} images listed in {ann_file} are not in {img_dir} "
            f"(e.g. {absent[0]}); point --data-root at the folder these annotations belong to"
        )


def check_samples(ann: dict, *, ann_file: str | Path, keypoints: bool, training: bool) -> None:
    """Checks that the annotations leave the dataset something to load: mmengine's dataset fails with "need at least
    one array to concatenate" (a traceback, after ``--check``) on an empty one. mmdet's training set keeps the
    images with a box of a listed category (``filter_empty_gt``); mmpose's keeps the person instances with
    keypoints; a test set needs images (detection) or such instances (pose).

    Raises:
        TransferInputError: nothing would be loaded (names what is missing).
    """
    fix = "restore the original COCO file, or point --data-root at a complete one"
    if not ann["images"]:
        raise TransferInputError(f"annotation file {ann_file} lists no images; {fix}")
    image_ids = {im.get("id") for im in ann["images"] if isinstance(im, dict)}
    anns = [a for a in ann["annotations"] if isinstance(a, dict) and a.get("image_id") in image_ids]
    if keypoints:
        if not any((a.get("num_keypoints") or 0) > 0 for a in anns):
            raise TransferInputError(
                f"annotation file {ann_file} has no person instance with keypoints (num_keypoints > 0) on its "
                f"images: pose has nothing to {'train on' if training else 'score'}; {fix}"
            )
    elif training:
        category_ids = {c.get("id") for c in ann["categories"] if isinstance(c, dict)}
        if not any(a.get("category_id") in category_ids for a in anns):
            raise TransferInputError(
                f"annotation file {ann_file} has no box of a listed category on its images (mmdet drops images "
                f"without one): nothing to train on; {fix}"
            )


def check_person_dets(
    path: str | Path, *, ann: dict | None = None, ann_file: str | Path | None = None, score_thr: float = 0.0
) -> None:
    """Checks a top-down person-detection file: a JSON list of ``{image_id, category_id, bbox, score}``.

    Args:
        path: the detection file.
        ann: the annotations the boxes are evaluated against (``ann_file``'s content); when given, every box
            must be on one of its images (mmpose looks each one up) and at least one person box must reach
            ``score_thr``: without any, pose evaluation would have nothing to score.
        ann_file: the annotation file's name, for the message.
        score_thr: the dataset's ``filter_cfg.bbox_score_thr`` (boxes scored below it are dropped).

    Raises:
        TransferInputError: missing or malformed file, boxes on unknown images, or no usable person box.
    """
    path = Path(path)
    if not path.is_file():
        raise TransferInputError(f"person detection file {path} not found; pass an existing --person-dets or drop it")
    try:
        dets = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TransferInputError(
            f"person detection file {path} is not valid JSON ({e}); pass the original file"
        ) from None
    if not isinstance(dets, list) or not all(isinstance(d, dict) and _DET_KEYS <= d.keys() for d in dets):
        raise TransferInputError(
            f"person detection file {path} is malformed (want a list of {{image_id, category_id, bbox, score}}); "
            "pass e.g. COCO_val2017_detections_AP_H_56_person.json"
        )
    if ann is None:
        return
    image_ids = {im.get("id") for im in ann["images"]}
    foreign = [d["image_id"] for d in dets if d["image_id"] not in image_ids]
    if foreign:
        raise TransferInputError(
            f"{len(foreign)} of {len(dets)} boxes in person detection file {path} are on images not in {ann_file} "
            f"(e.g. image_id {foreign[0]}); pass the detection file made for these annotations"
        )
    if not any(d["category_id"] == 1 and d["score"] >= score_thr for d in dets):
        raise TransferInputError(
            f"person detection file {path} has no person box (category_id 1) with score >= {score_thr} on the "
            f"images of {ann_file}: pose evaluation would have nothing to score; pass another file or lower "
            "filter_cfg.bbox_score_thr"
        )


def check_coco_inputs(cfg, *, keypoints: bool) -> None:
    """Checks every dataset and evaluator annotation file ``cfg`` reads, and their image folders.

    Args:
        cfg: the filled mmengine config (after :func:`downstream.config.build_transfer_config`).
        keypoints: the annotations must carry keypoints (pose).
    """
    loaded: dict[Path, dict] = {}
    checked: set[tuple[Path, Path]] = set()
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        ds = cfg.get(name, {}).get("dataset")
        if ds is None:
            continue
        root = Path(ds.get("data_root") or "")
        ann_file = root / ds.ann_file
        img_dir = root / ds.get("data_prefix", {}).get("img", "")
        if ann_file not in loaded:
            loaded[ann_file] = load_coco_json(ann_file, keypoints=keypoints)
        if (ann_file, img_dir) not in checked:
            checked.add((ann_file, img_dir))
            check_images(loaded[ann_file], img_dir=img_dir, ann_file=ann_file)
        training = name == "train_dataloader"
        if not (ds.get("bbox_file") and not training):  # a test set on detected boxes: check_person_dets below
            check_samples(loaded[ann_file], ann_file=ann_file, keypoints=keypoints, training=training)
        if ds.get("bbox_file"):
            thr = (ds.get("filter_cfg") or {}).get("bbox_score_thr", 0.0)
            check_person_dets(ds.bbox_file, ann=loaded[ann_file], ann_file=ann_file, score_thr=thr)
    for name in ("val_evaluator", "test_evaluator"):
        evaluator = cfg.get(name)
        if isinstance(evaluator, dict) and evaluator.get("ann_file") and Path(evaluator.ann_file) not in loaded:
            load_coco_json(evaluator.ann_file, keypoints=keypoints)
