"""DaP-pretrain: Drop-and-Pick pretraining for timm models.

Importing the package registers the paper's CIFAR networks as timm models
(``timm.create_model('cifar_resnet110')``). One exception: ``python -m dap_pretrain plan|cache|export`` does not
import timm and torch for the package itself (about 4 s on 2 cores, for a plan printed in 0.1 s); each command
imports what it needs (``export`` registers the networks before it reads a checkpoint).
"""

import sys

from dap_pretrain.schedule import DaPConfig, DaPSchedule, plan, solve_keep


def _running_the_cli() -> bool:
    """True while ``python [options] -m dap_pretrain ...`` imports this package to reach its ``__main__``: Python
    sets ``sys.argv[0]`` to ``-m`` until the module is found (its documented behaviour), and the module named after
    the first ``-m`` of the command line is this package. False in every other case (then the import is eager)."""
    if sys.argv[:1] != ["-m"]:
        return False
    args = iter(getattr(sys, "orig_argv", [])[1:])
    for arg in args:  # the interpreter's options, up to the first -m (a script, -c or -- end them)
        if arg in ("-W", "-X"):
            next(args, None)  # their value
        elif arg == "-m":
            return next(args, None) == "dap_pretrain"
        elif arg.startswith("-m"):
            return arg == "-mdap_pretrain"
        elif not arg.startswith("-") or arg.startswith("-c") or arg == "--":
            return False
    return False


if not _running_the_cli():
    from dap_pretrain import models  # noqa: F401  (registers cifar_* with timm)
    from dap_pretrain.export import export_backbone, load_backbone

__version__ = "0.1.0"
__all__ = ["DaPConfig", "DaPSchedule", "export_backbone", "load_backbone", "plan", "solve_keep", "__version__"]
