"""Drop-and-Pick inside mmengine/mmpretrain: the same engine as the timm trainer, a second front end.

Importing this subpackage (configs do it through ``custom_imports=dict(imports=['dap_pretrain.mm'])``) registers:

* ``DaPMMSampler`` in mmengine's ``DATA_SAMPLERS``: :class:`~dap_pretrain.data.sampler.DaPSampler` over an
  mmengine dataset (``train_dataloader.sampler=dict(type='DaPMMSampler')``);
* ``DaPClsHead`` in mmpretrain's ``MODELS``: ``LinearClsHead`` that records each training sample's loss
  (``model.head.type='DaPClsHead'``);
* ``DaPHook`` in mmengine's ``HOOKS``: schedule, accounting, checkpoint state, ``run.json``/``summary.csv``
  (``custom_hooks=[dict(type='DaPHook')]``).

The DaP parameters live in the config's top-level ``dap = dict(warmup=..., interval=..., keep=..., active=...,
reuse=..., select=..., seed=...)`` block (see :func:`~dap_pretrain.mm.settings.resolve_dap`). ``import dap_pretrain``
never imports this subpackage, so the timm path works without mmengine/mmpretrain installed.
"""

import logging

from dap_pretrain.compat import without_broken_multimodal

_notice = without_broken_multimodal()  # before head.py imports mmpretrain.models
if _notice:
    logging.getLogger(__name__).warning(_notice)

from dap_pretrain.mm.head import DaPClsHead  # noqa: E402
from dap_pretrain.mm.hook import DaPHook  # noqa: E402
from dap_pretrain.mm.sampler import DaPMMSampler  # noqa: E402
from dap_pretrain.mm.settings import DaPMMError, resolve_dap  # noqa: E402

__all__ = ["DaPClsHead", "DaPHook", "DaPMMError", "DaPMMSampler", "resolve_dap"]
