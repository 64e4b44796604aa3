"""``DaPClsHead``: mmpretrain's ``LinearClsHead`` that also hands each training sample's loss to the DaP sampler.

Who calls what, and when: :class:`~dap_pretrain.mm.hook.DaPHook` calls :meth:`DaPLossMixin.attach` with the
training sampler in ``before_train`` and :meth:`DaPLossMixin.detach` in ``after_train``. While attached, every
training forward (``ImageClassifier.loss`` -> ``head.loss``) computes the loss once per sample
(``reduction_override='none'``), records it against the batch's ``sample_idx`` (carried in each data sample's
metainfo by ``PackInputs``, so indices travel in the batch), and returns the batch mean for backward, which is
exactly the loss ``ClsHead`` returns. Detached (inference, or plain mmpretrain use) it is the stock head.

``DaPClsHead`` replaces ``LinearClsHead`` only (same arguments, same weights). Another head that subclasses
``ClsHead`` and keeps its ``_get_loss`` (e.g. ``VisionTransformerClsHead``) gets the same recording from
:class:`DaPLossMixin`: register ``class DaPViTHead(DaPLossMixin, VisionTransformerClsHead)`` in ``MODELS``.
"""

from __future__ import annotations

import torch
from mmpretrain.models.heads import ClsHead, LinearClsHead
from mmpretrain.registry import MODELS

from dap_pretrain.mm.settings import DaPMMError

RANKED_SELECT = ("hard",)  # dap.select strategies that rank samples by their recorded losses
MIXED_BATCH_REFUSAL = (
    "mixup/cutmix (model.train_cfg.augments) cannot be combined with dap.select='hard' (a mixed sample's loss has no "
    "single owner); remove them, or set dap.select='none' (all data) or 'random'"
)


class DaPLossMixin:
    """Per-sample loss recording for a ``ClsHead`` subclass that keeps ``ClsHead._get_loss``; put it first in the
    bases (``class H(DaPLossMixin, SomeClsHead)``) so its ``_get_loss`` runs instead of ``ClsHead``'s."""

    _dap_recorder = None  # an object with record(indices, losses), e.g. DaPMMSampler; None = stock behaviour
    _dap_ranked = True

    def attach(self, recorder, *, ranked: bool = True) -> None:
        """Record training losses into ``recorder.record(indices, losses)`` from now on.

        Args:
            recorder: e.g. the :class:`~dap_pretrain.mm.sampler.DaPMMSampler`.
            ranked: the losses rank samples (``dap.select='hard'``), so a mixed batch (mixup/cutmix) is refused;
                ``False`` records mixed samples' losses too, for counting the samples trained only.
        """
        self._dap_recorder = recorder
        self._dap_ranked = ranked

    def detach(self) -> None:
        self._dap_recorder = None

    def _get_loss(self, cls_score: torch.Tensor, data_samples: list, **kwargs) -> dict:
        if self._dap_recorder is None:
            return super()._get_loss(cls_score, data_samples, **kwargs)
        mixed = "gt_score" in data_samples[0]
        if mixed and self._dap_ranked:
            # A mixed image's loss belongs to two samples; ranking either by it would be silently wrong.
            raise DaPMMError(MIXED_BATCH_REFUSAL)
        indices = [s.metainfo.get("sample_idx") for s in data_samples]
        if any(i is None for i in indices):
            raise DaPMMError(
                "a training data sample has no 'sample_idx' in its metainfo; keep 'sample_idx' in the train "
                "pipeline's PackInputs meta_keys (mmpretrain's default)"
            )
        if mixed:  # recorded only to count the samples trained (dap.select='none' or 'random')
            target = torch.stack([s.gt_score for s in data_samples])
        else:
            target = torch.cat([s.gt_label for s in data_samples])
        batch = cls_score.size(0)
        per_sample = self.loss_module(cls_score, target, reduction_override="none", **kwargs).reshape(batch, -1).sum(1)
        self._dap_recorder.record(torch.as_tensor(indices, dtype=torch.int64), per_sample.detach())
        losses = {"loss": per_sample.sum() / batch}  # = ClsHead's mean (avg_factor = batch size)
        if self.cal_acc and not mixed:
            from mmpretrain.evaluation.metrics import Accuracy

            acc = Accuracy.calculate(cls_score, target, topk=self.topk)
            losses.update({f"accuracy_top-{k}": a for k, a in zip(self.topk, acc, strict=True)})
        return losses


@MODELS.register_module()
class DaPClsHead(DaPLossMixin, LinearClsHead):
    """``LinearClsHead`` with per-sample loss recording for DaP; same arguments, same weights (``fc.*``)."""


def head_refusal(head_type) -> str | None:
    """Why ``model.head.type=head_type`` cannot record DaP's per-sample losses (one line naming the fix), or ``None``.

    ``head_type`` is a name registered in mmpretrain's ``MODELS`` or a class.
    """
    if head_type is None:
        return "model.head has no type; set model.head.type='DaPClsHead' for DaP"
    cls = MODELS.get(head_type) if isinstance(head_type, str) else head_type
    if cls is None:
        return f"model.head.type {head_type!r} is not registered in mmpretrain's MODELS; check its spelling"
    if isinstance(cls, type) and issubclass(cls, DaPLossMixin):
        return None
    name = getattr(cls, "__name__", str(head_type))
    if cls is LinearClsHead:
        return f"model.head.type is '{name}'; set it to 'DaPClsHead' (LinearClsHead recording each sample's loss)"
    fix = (
        f"register `class DaP{name}(DaPLossMixin, {name})` (dap_pretrain.mm.head) in mmpretrain's MODELS and set "
        f"model.head.type='DaP{name}'"
        if isinstance(cls, type) and issubclass(cls, ClsHead) and cls._get_loss is ClsHead._get_loss
        else "use a LinearClsHead config"
    )
    return (
        f"model.head.type is '{name}', which cannot record per-sample losses; DaPClsHead replaces LinearClsHead only "
        f"(same arguments): for this head {fix}"
    )
