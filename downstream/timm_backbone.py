"""A registered mm backbone around any timm model's ``features_only`` wrapper, with frozen BatchNorm.

Lets every backbone the trainer can release (DenseNet-121/169, MobileNet-V1, ResNet-18/152, ...)
feed mmdet's FPN and mmpose's heads. ResNet-50/101 use mm's own ``ResNet`` instead (the paper's setup).
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from timm.layers import freeze_batch_norm_2d

from downstream.backbone import compare_state_dicts, load_backbone_state_dict


@MODELS.register_module()
class DaPTimmBackbone(BaseModule):
    """timm ``features_only`` backbone for mmdet/mmpose.

    Registered in mmengine's root ``MODELS`` registry, so both mmdet's and mmpose's child registries
    find it. Weights load at construction through timm's own pretrained path. timm loads
    ``features_only`` weights non-strictly, so the checkpoint is first compared with the full model
    (classifier keys ignored) and one of another architecture raises ``ValueError``. BatchNorm layers
    are then replaced by ``FrozenBatchNorm2d`` (statistics and affine parameters fixed, as the paper
    fixes BN during fine-tuning).

    Args:
        model_name: timm model name, e.g. ``'densenet121'``.
        out_indices: feature levels to return; level ``i`` has stride ``2 ** (i + 1)`` for the
            usual 5-level timm CNNs, so ``(1, 2, 3, 4)`` feeds an FPN with strides 4-32.
        checkpoint: path to a plain state dict of the full timm model (``backbone.pth`` of an export);
            ``None`` keeps timm's random initialisation.
        frozen_bn: replace BatchNorm by ``FrozenBatchNorm2d`` after loading.
        init_cfg: mmengine init config; must stay ``None`` (weights come from ``checkpoint``).
    """

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        checkpoint: str | None = None,
        frozen_bn: bool = True,
        init_cfg: dict | None = None,
    ):
        if init_cfg is not None:
            raise ValueError("DaPTimmBackbone loads weights from `checkpoint=`, not init_cfg")
        super().__init__(init_cfg=None)
        kwargs = {}
        if checkpoint is not None:
            _check_checkpoint(model_name, checkpoint)
            kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
        self.body = timm.create_model(model_name, features_only=True, out_indices=tuple(out_indices), **kwargs)
        if frozen_bn:
            self.body = freeze_batch_norm_2d(self.body)
        self.out_channels = list(self.body.feature_info.channels())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns the feature maps of ``out_indices``, finest first (mm's backbone convention)."""
        return tuple(self.body(x))


def _check_checkpoint(model_name: str, checkpoint: str) -> None:
    """timm loads features_only weights non-strictly (it expects the classifier to be missing), so a checkpoint
    of another architecture would load nothing, silently; compare it with the full model first."""
    reference = timm.create_model(model_name, num_classes=0, pretrained=False).state_dict()
    problems = compare_state_dicts(
        checkpoint=load_backbone_state_dict(checkpoint), reference=reference, model=model_name
    )
    if problems:
        raise ValueError(f"{checkpoint} does not fit timm {model_name}: {'; '.join(problems)}")


def timm_feature_channels(model_name: str, out_indices: Sequence[int]) -> list[int]:
    """Channels of ``model_name``'s feature levels ``out_indices`` (for an FPN's or head's ``in_channels``).

    Raises:
        ValueError: the levels' strides are not ``2 ** (i + 1)`` (a ViT's are all 16), which the FPN's and
            heads' configs assume; such a model would fail only once training started.
    """
    info = timm.create_model(model_name, features_only=True, out_indices=tuple(out_indices), pretrained=False)
    strides, expected = list(info.feature_info.reduction()), [2 ** (i + 1) for i in out_indices]
    if strides != expected:
        raise ValueError(f"its feature levels {list(out_indices)} have strides {strides}, not {expected}")
    return list(info.feature_info.channels())
