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

from dap_pretrain.mm.head import DaPClsHead
from dap_pretrain.mm.hook import DaPHook
from dap_pretrain.mm.sampler import DaPMMSampler
from dap_pretrain.mm.settings import DaPMMError, resolve_dap

__all__ = ["DaPClsHead", "DaPHook", "DaPMMError", "DaPMMSampler", "resolve_dap"]
