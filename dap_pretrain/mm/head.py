"""``DaPClsHead``: mmpretrain's ``LinearClsHead`` that also hands each training sample's loss to the DaP sampler.

Who calls what, and when: :class:`~dap_pretrain.mm.hook.DaPHook` calls :meth:`DaPClsHead.attach` with the
training sampler in ``before_train`` and :meth:`DaPClsHead.detach` in ``after_train``. While attached, every
training forward (``ImageClassifier.loss`` -> ``head.loss``) computes the loss once per sample
(``reduction_override='none'``), records it against the batch's ``sample_idx`` (carried in each data sample's
metainfo by ``PackInputs``, so indices travel in the batch), and returns the batch mean for backward, which is
exactly the loss ``LinearClsHead`` returns. Detached (inference, or plain mmpretrain use) it is ``LinearClsHead``.
"""

from __future__ import annotations

import torch
from mmpretrain.models.heads import LinearClsHead
from mmpretrain.registry import MODELS

from dap_pretrain.mm.settings import DaPMMError


@MODELS.register_module()
class DaPClsHead(LinearClsHead):
    """``LinearClsHead`` with per-sample loss recording for DaP; same arguments, same weights (``fc.*``)."""

    _dap_recorder = None  # an object with record(indices, losses), e.g. DaPMMSampler; None = stock behaviour

    def attach(self, recorder) -> None:
        """Record training losses into ``recorder.record(indices, losses)`` from now on."""
        self._dap_recorder = recorder

    def detach(self) -> None:
        self._dap_recorder = None

    def _get_loss(self, cls_score: torch.Tensor, data_samples: list, **kwargs) -> dict:
        if self._dap_recorder is None:
            return super()._get_loss(cls_score, data_samples, **kwargs)
        if "gt_score" in data_samples[0]:
            # A mixed image's loss belongs to two samples; ranking either by it would be silently wrong.
            raise DaPMMError(
                "mixup/cutmix (model.train_cfg.augments) cannot be combined with DaP (a mixed sample's loss has "
                "no single owner); remove them or set dap.select='none'"
            )
        indices = [s.metainfo.get("sample_idx") for s in data_samples]
        if any(i is None for i in indices):
            raise DaPMMError(
                "a training data sample has no 'sample_idx' in its metainfo; keep 'sample_idx' in the train "
                "pipeline's PackInputs meta_keys (mmpretrain's default)"
            )
        target = torch.cat([s.gt_label for s in data_samples])
        batch = cls_score.size(0)
        per_sample = self.loss_module(cls_score, target, reduction_override="none", **kwargs).reshape(batch, -1).sum(1)
        self._dap_recorder.record(torch.as_tensor(indices, dtype=torch.int64), per_sample.detach())
        losses = {"loss": per_sample.sum() / batch}  # = LinearClsHead's mean (avg_factor = batch size)
        if self.cal_acc:
            from mmpretrain.evaluation.metrics import Accuracy

            acc = Accuracy.calculate(cls_score, target, topk=self.topk)
            losses.update({f"accuracy_top-{k}": a for k, a in zip(self.topk, acc, strict=True)})
        return losses
