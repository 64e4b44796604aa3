"""Models registered with timm on import: the paper's CIFAR networks (``timm.create_model('cifar_resnet110')``)."""

from dap_pretrain.models.cifar import CifarDenseNet, CifarPreActResNet, CifarResNet

__all__ = ["CifarDenseNet", "CifarPreActResNet", "CifarResNet"]
