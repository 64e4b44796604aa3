"""COCO transfer suite: mm glue for fine-tuning DaP backbones (paper Tables 8-9).

Nothing here imports mmdet/mmpose at import time, so ``python -m downstream.report`` works
without the mm stack. The pieces:

* :mod:`downstream.timm_backbone` registers ``DaPTimmBackbone`` (timm ``features_only``, frozen BN)
  in mmengine's model registry; configs load it through ``custom_imports``.
* :mod:`downstream.backbone` resolves an export folder / checkpoint and checks it against a config.
* :mod:`downstream.config` picks and fills a config in ``configs/det`` / ``configs/pose``.
* :mod:`downstream.checks` validates the COCO inputs before anything is written.
* :mod:`downstream.compat` handles torch>=2.6 `weights_only` for mmengine checkpoints.
* :mod:`downstream.transfer` fine-tunes, evaluates and writes ``WORK_DIR/metrics.json``.
* :mod:`downstream.report` turns work dirs into the paper's tables.
"""

from dap_pretrain.errors import DapError


class TransferInputError(DapError, ValueError):
    """Bad user input; the message is one line naming the problem and the fix.

    Entry points catch it, print the message on stderr and exit with code 2.
    """
