"""The paper's CIFAR networks, registered as timm models.

Importing this module registers ``cifar_resnet20``, ``cifar_resnet56``, ``cifar_resnet110`` (He et al. 2016,
"Deep Residual Learning", Sec. 4.2), ``cifar_resnet164`` (He et al. 2016, "Identity Mappings", pre-activation
bottleneck) and ``cifar_densenet_bc100`` (Huang et al. 2017, DenseNet-BC with L=100, k=12), so that
``timm.create_model('cifar_resnet110', num_classes=100)`` and ``timm.create_model(name, features_only=True)``
work like for any timm model.

All take 32x32 inputs and keep the stem at full resolution; the three stages have reductions 1, 2 and 4, and
``features_only`` returns one map per stage. The ResNet-20/56/110 shortcuts default to the paper's option A
(parameter-free: subsample, then zero-pad the new channels); ``shortcut='B'`` selects 1x1 conv projections.
Parameter counts at 10 classes (tests/models/test_cifar.py): 269,722 / 853,018 / 1,727,962 (option A),
1,703,258 (ResNet-164) and 769,162 (DenseNet-BC-100), matching the papers' 0.27M / 0.85M / 1.7M / 1.7M / 0.8M.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["CifarResNet", "CifarPreActResNet", "CifarDenseNet"]

_logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean of the CIFAR-10 train split
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # per-channel std of the CIFAR-10 train split (over all pixels)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # He et al. 2015, as both papers
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class _ClassifierMixin:
    """timm's classifier interface: ``get_classifier``, ``reset_classifier``, ``forward_head``, ``forward``.

    The owner sets ``num_classes``, ``num_features``, ``drop_rate``, ``global_pool`` and ``fc`` (via
    :meth:`reset_classifier`) and defines ``forward_features``.
    """

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the classifier (0 classes = pooled features out); called by timm and by fine-tuning code."""
        self.num_classes = num_classes
        pool_type = global_pool if global_pool is not None else getattr(self, "_pool_type", "avg")
        self._pool_type = pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool_type)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------------
# ResNet-20/56/110: post-activation basic blocks (He et al. 2016, Sec. 4.2)


class _PadShortcut(nn.Module):
    """Option A shortcut: keep every ``stride``-th pixel, zero-pad the extra channels evenly on both sides."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class _BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            if shortcut == "A":
                self.downsample = _PadShortcut(in_chs, out_chs, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class CifarResNet(_ClassifierMixin, nn.Module):
    """He et al. (2016) CIFAR ResNet: 6n+2 layers, 3 stages of n basic blocks with 16/32/64 channels.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, ...).
        num_classes: classifier outputs; 0 gives pooled features.
        in_chans: input channels.
        shortcut: 'A' (paper: parameter-free subsample + zero-pad) or 'B' (1x1 conv + BN projection) where the
            shape changes; identity elsewhere.
        drop_rate: dropout before the classifier.
        global_pool: timm pool type ('avg', 'max', ... or '' for none).
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        shortcut: str = "A",
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth={depth} is invalid for a CIFAR ResNet: must be 6n+2 (20, 56, 110, ...)")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut={shortcut!r} is invalid: must be 'A' or 'B'")
        n = (depth - 2) // 6
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = []
        in_chs = 16
        for i, (chs, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
            blocks = [_BasicBlock(in_chs if j == 0 else chs, chs, stride if j == 0 else 1, shortcut) for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=chs, reduction=2**i, module=f"layer{i + 1}"))
            in_chs = chs
        self.num_features = self.head_hidden_size = in_chs
        self.reset_classifier(num_classes, global_pool)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


# ---------------------------------------------------------------------------------------------------------------
# ResNet-164: pre-activation bottleneck blocks (He et al. 2016, "Identity Mappings in Deep Residual Networks")


class _PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_chs: int, mid_chs: int, stride: int):
        super().__init__()
        out_chs = mid_chs * self.expansion
        self.norm1 = BatchNormAct2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.norm2 = BatchNormAct2d(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride, 1, bias=False)
        self.norm3 = BatchNormAct2d(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_pre = self.norm1(x)
        # a projection shortcut shares the block's pre-activation, as in the authors' fb.resnet.torch code
        shortcut = x if self.downsample is None else self.downsample(x_pre)
        x = self.conv1(x_pre)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return x + shortcut


class CifarPreActResNet(_ClassifierMixin, nn.Module):
    """He et al. (2016) pre-activation ResNet for CIFAR: 9n+2 layers of bottlenecks, widths 16/32/64 (x4 out).

    Args:
        depth: 9n+2 (164 gives 18 bottlenecks per stage, 1.7M parameters).
        num_classes: classifier outputs; 0 gives pooled features.
        in_chans: input channels.
        drop_rate: dropout before the classifier.
        global_pool: timm pool type.
    """

    def __init__(
        self,
        depth: int = 164,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        if (depth - 2) % 9 or depth < 11:
            raise ValueError(f"depth={depth} is invalid for a pre-activation bottleneck ResNet: must be 9n+2 (164)")
        n = (depth - 2) // 9
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.feature_info = []
        in_chs = 16
        for i, (mid, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
            blocks = []
            for j in range(n):
                blocks.append(_PreActBottleneck(in_chs, mid, stride if j == 0 else 1))
                in_chs = mid * _PreActBottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            # the last stage is read after the final BN-ReLU, as timm's ResNetV2 does
            module = f"layer{i + 1}" if i < 2 else "norm"
            self.feature_info.append(dict(num_chs=in_chs, reduction=2**i, module=module))
        self.norm = BatchNormAct2d(in_chs)
        self.num_features = self.head_hidden_size = in_chs
        self.reset_classifier(num_classes, global_pool)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------------------
# DenseNet-BC (Huang et al. 2017): bottleneck layers, compression 0.5


class _DenseLayer(nn.Module):
    def __init__(self, in_chs: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = BatchNormAct2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, bn_size * growth_rate, 1, bias=False)
        self.norm2 = BatchNormAct2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv2(self.norm2(self.conv1(self.norm1(x))))], dim=1)


class _Transition(nn.Module):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.norm = BatchNormAct2d(in_chs)
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.norm(x)))


class CifarDenseNet(_ClassifierMixin, nn.Module):
    """Huang et al. (2017) DenseNet-BC for CIFAR: 3 dense blocks of (depth - 4) / 6 bottleneck layers.

    Args:
        depth: total depth L; (L - 4) must be divisible by 6 (100 gives 16 layers per block).
        growth_rate: k, channels each layer adds (12).
        compression: theta, fraction of channels a transition keeps (0.5).
        num_classes: classifier outputs; 0 gives pooled features.
        in_chans: input channels.
        drop_rate: dropout before the classifier.
        global_pool: timm pool type.
    """

    def __init__(
        self,
        depth: int = 100,
        growth_rate: int = 12,
        compression: float = 0.5,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"depth={depth} is invalid for DenseNet-BC: (depth - 4) must be divisible by 6 (100)")
        n = (depth - 4) // 6
        self.drop_rate = drop_rate
        chs = 2 * growth_rate  # the paper's BC stem width
        self.conv1 = nn.Conv2d(in_chans, chs, 3, 1, 1, bias=False)
        self.feature_info = []
        for i in range(3):
            self.add_module(
                f"dense{i + 1}",
                nn.Sequential(*[_DenseLayer(chs + j * growth_rate, growth_rate, bn_size=4) for j in range(n)]),
            )
            chs += n * growth_rate
            self.feature_info.append(dict(num_chs=chs, reduction=2**i, module=f"dense{i + 1}" if i < 2 else "norm"))
            if i < 2:
                out_chs = int(chs * compression)
                self.add_module(f"trans{i + 1}", _Transition(chs, out_chs))
                chs = out_chs
        self.norm = BatchNormAct2d(chs)
        self.num_features = self.head_hidden_size = chs
        self.reset_classifier(num_classes, global_pool)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        return self.norm(self.dense3(x))


# ---------------------------------------------------------------------------------------------------------------
# timm registration


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "cifar_resnet20": _cfg(),
        "cifar_resnet56": _cfg(),
        "cifar_resnet110": _cfg(),
        "cifar_resnet164": _cfg(),
        "cifar_densenet_bc100": _cfg(),
    }
)


def _create(model_cls: type[nn.Module], variant: str, pretrained: bool, **kwargs) -> nn.Module:
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2)), **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016), 0.27M parameters."""
    return _create(CifarResNet, "cifar_resnet20", pretrained, depth=20, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016), 0.85M parameters."""
    return _create(CifarResNet, "cifar_resnet56", pretrained, depth=56, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR (He et al. 2016), 1.7M parameters."""
    return _create(CifarResNet, "cifar_resnet110", pretrained, depth=110, **kwargs)


@register_model
def cifar_resnet164(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """Pre-activation bottleneck ResNet-164 for CIFAR (He et al. 2016, "Identity Mappings"), 1.7M parameters."""
    return _create(CifarPreActResNet, "cifar_resnet164", pretrained, depth=164, **kwargs)


@register_model
def cifar_densenet_bc100(pretrained: bool = False, **kwargs) -> CifarDenseNet:
    """DenseNet-BC (L=100, k=12) for CIFAR (Huang et al. 2017), 0.8M parameters."""
    return _create(CifarDenseNet, "cifar_densenet_bc100", pretrained, depth=100, growth_rate=12, **kwargs)
