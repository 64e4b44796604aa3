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

Mixed batches (mmpretrain's ``Mixup``, ``CutMix``, ``ResizeMix``: ``train_cfg.augments``, which mmpretrain runs
as the data preprocessor's ``batch_augments``): a mixed image carries several samples' labels, so its loss is not
one sample's. The hook wraps the preprocessor's ``batch_augments`` in :class:`TracedBatchAugments`, which hands the
batch augment an identity matrix beside the labels: mixed like the labels, it comes back as the mixing weights
``W`` (image i is ``sum_k W[i, k]`` of sample k), whatever permutation and lam the augment drew. Each sample is
then ranked by its own label's loss wherever it was trained, ``own_k = sum_i W[i, k] * loss(image i, label of k)``
(divided by ``sum_i W[i, k]``, which is 1 for a permutation), as the timm trainer does (``dap_pretrain.mixing``);
the ``own`` losses of a batch sum to its images' losses for a loss linear in its target, which the first mixed
batch checks (FocalLoss, AsymmetricLoss and LabelSmoothLoss 'multi_label' are refused). The model trains on the
images' losses, unchanged.
"""

from __future__ import annotations

import torch
from mmpretrain.models.heads import ClsHead, LinearClsHead
from mmpretrain.registry import MODELS

from dap_pretrain.mm.settings import DaPMMError

RANKED_SELECT = ("hard",)  # dap.select strategies that rank samples by their recorded losses
MIXED_BATCH_REFUSAL = (
    "this batch was mixed (gt_score) outside the data preprocessor's batch_augments, so DaP cannot tell whose loss "
    "is whose; mix through model.train_cfg.augments, or set dap.select='none' (all data) or 'random'"
)


class TracedBatchAugments:
    """Wraps a data preprocessor's ``batch_augments`` (``(inputs, scores) -> (inputs, scores)``) and keeps each
    training batch's mixing weights for the head (module docstring).

    ``scores`` gets ``n`` more columns, an identity matrix; any augment that mixes the rows of ``scores`` linearly
    (mmpretrain's all do) mixes them too. They are split off again, so the preprocessor and the head see the scores
    they would without the wrapper. :meth:`take` returns the last batch's ``W`` (n, n) once.
    """

    def __init__(self, inner):
        self.inner = inner
        self._weights: torch.Tensor | None = None

    def __call__(self, inputs: torch.Tensor, scores: torch.Tensor):
        n, classes = scores.shape
        tagged = torch.cat([scores.float(), torch.eye(n, dtype=torch.float32, device=scores.device)], dim=1)
        inputs, mixed = self.inner(inputs, tagged)
        if mixed.shape != tagged.shape:
            raise DaPMMError(
                f"batch augment {type(self.inner).__name__} returned scores of shape {tuple(mixed.shape)} for "
                f"{tuple(tagged.shape)}; DaP needs augments that mix the rows of the scores (mmpretrain's Mixup, "
                "CutMix, ResizeMix), or dap.select='none' or 'random'"
            )
        self._weights = mixed[:, classes:]
        return inputs, mixed[:, :classes]

    def take(self) -> torch.Tensor | None:
        weights, self._weights = self._weights, None
        return weights


class DaPLossMixin:
    """Per-sample loss recording for a ``ClsHead`` subclass that keeps ``ClsHead._get_loss``; put it first in the
    bases (``class H(DaPLossMixin, SomeClsHead)``) so its ``_get_loss`` runs instead of ``ClsHead``'s."""

    _dap_recorder = None  # an object with record(indices, losses), e.g. DaPMMSampler; None = stock behaviour
    _dap_ranked = True
    _dap_mixing = None  # a TracedBatchAugments: the mixing weights of each mixed batch
    _dap_split_checked = False  # the loss module splits mixed losses exactly (checked on the first mixed batch)

    def attach(self, recorder, *, ranked: bool = True, mixing: TracedBatchAugments | None = None) -> None:
        """Record training losses into ``recorder.record(indices, losses)`` from now on.

        Args:
            recorder: e.g. the :class:`~dap_pretrain.mm.sampler.DaPMMSampler`.
            ranked: the losses rank samples (``dap.select='hard'``), so a mixed batch must come with its mixing
                weights (from ``mixing``), else it is refused; ``False`` records a mixed image's loss against the
                sample whose index it carries where there are no weights (it counts the samples trained only).
            mixing: the data preprocessor's traced ``batch_augments``, whose weights split a mixed batch's losses.
        """
        self._dap_recorder = recorder
        self._dap_ranked = ranked
        self._dap_mixing = mixing
        self._dap_split_checked = False

    def detach(self) -> None:
        self._dap_recorder = None
        self._dap_mixing = None

    def _own_losses(self, cls_score, data_samples: list, weights: torch.Tensor, per_image: torch.Tensor, **kwargs):
        """``own_k = sum_i W[i, k] * loss(image i, one-hot label of k) / sum_i W[i, k]``: sample k's label's loss,
        averaged over the images that carry it (for mmpretrain's augments, a permutation, the divisor is 1). Only
        the nonzero weights are evaluated (two per image for Mixup/CutMix), with the head's own loss module.

        On the first mixed batch after :meth:`attach`, checks that the split adds up to the images' losses: it does
        for losses linear in their target (CrossEntropyLoss, LabelSmoothLoss 'original'/'classy_vision'), not for
        FocalLoss, AsymmetricLoss or LabelSmoothLoss 'multi_label', which are refused.
        """
        labels = [s.gt_label for s in data_samples]
        if any(label.numel() != 1 for label in labels):
            raise DaPMMError(
                "a mixed batch has samples with several labels; DaP splits mixed losses for one label per sample: "
                "set dap.select='none' or 'random', or train without train_cfg.augments"
            )
        labels = torch.cat(labels).to(cls_score.device)
        weights = weights.to(cls_score.device)
        image, sample = weights.nonzero(as_tuple=True)
        onehot = torch.nn.functional.one_hot(labels[sample], cls_score.shape[1]).to(cls_score.dtype)
        pair = self.loss_module(cls_score[image], onehot, reduction_override="none", **kwargs)
        pair = pair.reshape(image.numel(), -1).sum(1)
        own = torch.zeros(labels.numel(), dtype=pair.dtype, device=pair.device)
        own.index_add_(0, sample, weights[image, sample].to(pair.dtype) * pair)
        if not self._dap_split_checked:
            total, expected = float(own.detach().sum()), float(per_image.detach().sum())
            if abs(total - expected) > 1e-4 * max(1.0, abs(expected)):
                raise DaPMMError(
                    f"the head's loss {type(self.loss_module).__name__} is not linear in its target, so a mixed "
                    f"image's loss cannot be split between its samples (the split sums to {total:.4g}, the images' "
                    f"losses to {expected:.4g}); use CrossEntropyLoss or LabelSmoothLoss (mode 'original' or "
                    "'classy_vision') with dap.select='hard', or set dap.select='none' or 'random'"
                )
            self._dap_split_checked = True
        return own / weights.sum(0).to(own.dtype).clamp_min(1e-6)

    def _get_loss(self, cls_score: torch.Tensor, data_samples: list, **kwargs) -> dict:
        if self._dap_recorder is None:
            return super()._get_loss(cls_score, data_samples, **kwargs)
        mixed = "gt_score" in data_samples[0]
        weights = self._dap_mixing.take() if mixed and self._dap_mixing is not None else None
        if mixed and weights is None and self._dap_ranked:
            # A mixed image's loss belongs to several samples; ranking by it without the weights would be wrong.
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
        owned = per_sample
        if weights is not None:
            owned = self._own_losses(cls_score, data_samples, weights, per_sample, **kwargs)
        self._dap_recorder.record(torch.as_tensor(indices, dtype=torch.int64), owned.detach())
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
