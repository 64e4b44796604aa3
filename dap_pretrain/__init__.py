"""DaP-pretrain: Drop-and-Pick pretraining for timm models.

Importing the package registers the paper's CIFAR networks as timm models
(``timm.create_model('cifar_resnet110')``).
"""

from dap_pretrain import models  # noqa: F401  (registers cifar_* with timm)
from dap_pretrain.export import export_backbone, load_backbone
from dap_pretrain.schedule import DaPConfig, DaPSchedule, plan, solve_keep

__version__ = "0.1.0"
__all__ = ["DaPConfig", "DaPSchedule", "export_backbone", "load_backbone", "plan", "solve_keep", "__version__"]
