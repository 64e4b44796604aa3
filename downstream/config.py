"""Pick the config for a (task, backbone) pair and fill in what a transfer run sets at run time.

The config files themselves (``configs/det/*.py``, ``configs/pose/*.py``) inherit the installed
mmdet/mmpose stock configs and override only the backbone; this module sets the per-run values:
the backbone checkpoint, the data root, the person-detection boxes and the work dir.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from downstream import TransferInputError
from downstream.backbone import BackboneSpec

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
# Feature levels the timm wrapper returns: strides 4-32 for an FPN; the last (stride 32) for a pose head.
DET_OUT_INDICES = (1, 2, 3, 4)
POSE_OUT_INDICES = (4,)


@dataclasses.dataclass(frozen=True)
class Task:
    """One row type of the paper's Tables 8-9.

    Attributes:
        method: the paper's name for the method (report column).
        table: paper table number (8: detection/segmentation, 9: keypoints).
        configs: timm model name -> config for the models with a native mm backbone config.
        timm_config: config for every other timm model (``DaPTimmBackbone``).
    """

    method: str
    table: int
    configs: dict[str, str]
    timm_config: str

    @property
    def is_pose(self) -> bool:
        return self.table == 9


TASKS = {
    "faster_rcnn": Task(
        method="FPN",
        table=8,
        configs={
            "resnet50": "det/faster-rcnn_r50_fpn_1x_coco_dap.py",
            "resnet101": "det/faster-rcnn_r101_fpn_1x_coco_dap.py",
        },
        timm_config="det/faster-rcnn_timm_fpn_1x_coco_dap.py",
    ),
    "mask_rcnn": Task(
        method="Mask R-CNN",
        table=8,
        configs={
            "resnet50": "det/mask-rcnn_r50_fpn_1x_coco_dap.py",
            "resnet101": "det/mask-rcnn_r101_fpn_1x_coco_dap.py",
        },
        timm_config="det/mask-rcnn_timm_fpn_1x_coco_dap.py",
    ),
    "simplebaseline": Task(
        method="SimpleBaseline",
        table=9,
        configs={
            "resnet50": "pose/td-hm_res50_8xb64-210e_coco-256x192_dap.py",
            "resnet101": "pose/td-hm_res101_8xb64-210e_coco-256x192_dap.py",
        },
        timm_config="pose/td-hm_timm_8xb64-210e_coco-256x192_dap.py",
    ),
}


def get_task(name: str) -> Task:
    """Returns the task, or raises ``TransferInputError`` naming the valid ones."""
    if name not in TASKS:
        raise TransferInputError(f"unknown TASK {name!r}; use one of {', '.join(TASKS)}")
    return TASKS[name]


def config_path(*, task: str, model: str) -> Path:
    """The config file for ``task`` with timm model ``model`` (native ResNet-50/101 or the timm wrapper)."""
    t = get_task(task)
    return CONFIG_ROOT / t.configs.get(model, t.timm_config)


def _loaders(cfg):
    return [cfg[k] for k in ("train_dataloader", "val_dataloader", "test_dataloader") if cfg.get(k)]


def set_data_root(cfg, data_root: str | Path) -> None:
    """Points every dataloader and COCO evaluator of ``cfg`` at ``data_root`` (in place).

    The stock configs join ``data_root + 'annotations/...'`` for the evaluators when the file is
    parsed, so changing ``data_root`` alone would leave them on ``data/coco/``.
    """
    root = os.fspath(data_root)
    for loader in _loaders(cfg):
        loader.dataset.data_root = root
    for split in ("val", "test"):
        evaluator, loader = cfg.get(f"{split}_evaluator"), cfg.get(f"{split}_dataloader")
        if evaluator is not None and loader is not None:
            evaluator.ann_file = os.path.join(root, loader.dataset.ann_file)


def set_backbone(cfg, *, task: str, spec: BackboneSpec) -> None:
    """Initialises the config's backbone from ``spec`` (in place).

    Native ResNet configs get ``init_cfg.checkpoint``; the timm-wrapper configs get the model name,
    the checkpoint and the input channels of the FPN (detection) or heatmap head (pose).
    """
    if spec.model in get_task(task).configs:
        cfg.model.backbone.init_cfg.checkpoint = os.fspath(spec.checkpoint)
        return
    from downstream.timm_backbone import timm_feature_channels

    out_indices = POSE_OUT_INDICES if get_task(task).is_pose else DET_OUT_INDICES
    try:
        channels = timm_feature_channels(spec.model, out_indices)
    except Exception as e:  # timm raises RuntimeError/AssertionError/KeyError for unsupported models
        raise TransferInputError(
            f"timm's features_only {spec.model} cannot feed {task} ({type(e).__name__}: {e}); transfer needs a "
            "CNN with 5 feature levels, strides 2 to 32 (ResNet, DenseNet, MobileNet, ...)"
        ) from None
    cfg.model.backbone.update(model_name=spec.model, checkpoint=os.fspath(spec.checkpoint), out_indices=out_indices)
    if get_task(task).is_pose:
        cfg.model.head.in_channels = channels[-1]
    else:
        cfg.model.neck.in_channels = channels


def set_person_boxes(cfg, person_dets: str | Path | None) -> None:
    """Top-down pose evaluation boxes: the person-detection file when given, ground-truth boxes otherwise."""
    for split in ("val_dataloader", "test_dataloader"):
        cfg[split].dataset.bbox_file = None if person_dets is None else os.fspath(person_dets)


def build_transfer_config(
    *,
    task: str,
    spec: BackboneSpec,
    data_root: str | Path,
    work_dir: str | Path,
    cfg_options: dict | None = None,
    person_dets: str | Path | None = None,
    launcher: str = "none",
):
    """Loads the task's config and fills in the run's values; ``cfg_options`` are merged last (they win).

    Args:
        task: one of :data:`TASKS`.
        spec: the resolved backbone.
        data_root: COCO folder (``annotations/``, ``train2017/``, ``val2017/``).
        work_dir: where mmengine writes logs/checkpoints and we write ``metrics.json``.
        cfg_options: ``key.path=value`` overrides as parsed by mmengine's ``DictAction``.
        person_dets: person-detection file for pose evaluation; ``None`` evaluates on GT boxes.
        launcher: mmengine launcher, ``'pytorch'`` under torchrun.

    Returns:
        The mmengine ``Config``.
    """
    from mmengine.config import Config

    path = config_path(task=task, model=spec.model)
    cfg = Config.fromfile(path)
    set_backbone(cfg, task=task, spec=spec)
    set_data_root(cfg, data_root)
    if get_task(task).is_pose:
        set_person_boxes(cfg, person_dets)
    elif person_dets is not None:
        raise TransferInputError(f"--person-dets is for simplebaseline only, not {task}; drop it")
    cfg.work_dir = os.fspath(work_dir)
    cfg.launcher = launcher
    if cfg_options:
        from dap_pretrain.mm.buildable import merge_options

        refusal = merge_options(cfg, cfg_options)
        if refusal:
            raise TransferInputError(refusal)
    return cfg
