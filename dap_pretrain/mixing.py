"""Mixup and CutMix with per-sample losses that DaP can rank (timm's ``Mixup``, plus whose loss is whose).

A mixed image carries two labels: image ``i`` is ``lam_i`` of sample ``i`` and ``1 - lam_i`` of its partner
``n-1-i`` (the batch reversed, as timm pairs them), and its soft-target loss is

    ell_i = lam_i * L_i(y_i) + (1 - lam_i) * L_i(y_{n-1-i})

where ``L_i(c)`` is image ``i``'s (label-smoothed) cross-entropy against class ``c``. Ranking sample ``i`` by
``ell_i`` would charge it for its partner's label. Here each sample is ranked by its own label, wherever that
label was trained: in its own image with weight ``lam_j`` and in its partner's with weight ``1 - lam_{n-1-j}``,
averaged over those weights:

    own_j = (lam_j * L_j(y_j) + (1 - lam_{n-1-j}) * L_{n-1-j}(y_j)) / (lam_j + 1 - lam_{n-1-j}).

In ``batch`` and ``pair`` mode both images of a pair share one ``lam``, the weights add up to 1, and the ``own``
losses of a batch sum to its ``ell`` losses: the batch's loss is split between the samples. In ``elem`` mode the
two draws are independent and the weights add up to anything in (0, 2); without the division a sample would be
ranked by its draws rather than by its difficulty (equally hard samples get equal ``own`` in every mode, tested).
The model is trained on ``ell`` (timm's ``SoftTargetCrossEntropy``, the same numbers); DaP and InfoBatch record
``own``; InfoBatch's loss weights scale each label's terms by that label's sample's weight. This split is this
project's, not the paper's: the paper trains without mixing.

Differences from timm's ``Mixup``, all deliberate:
- a batch of odd size is allowed (a DaP subset's last batch): its middle image is its own partner and stays
  unmixed, where timm asserts an even batch (its loader drops the last batch; this trainer trains every sample);
- the draws come from a generator seeded by ``(seed, rank, epoch, step)``, not numpy's global one, so a resumed run
  mixes its batches as the uninterrupted run did;
- only dense class-index targets (no ``multi_label``).
The parameter draws follow timm's: ``lam ~ Beta(alpha, alpha)`` per batch / pair / element, mixing with
probability ``prob``, CutMix instead of Mixup with probability ``switch_prob`` when both are on, CutMix's ``lam``
corrected to the pasted box's area (timm's ``correct_lam``) and boxes from ``cutmix_minmax`` where given.
On CUDA the per-image parameters reach the GPU through pinned memory, without waiting for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

MODES = ("batch", "pair", "elem")


@dataclass(frozen=True)
class MixParams:
    """One batch's draws: ``lam`` (n,) the share of each image that is its own sample (1.0: unmixed) and
    ``boxes`` (n, 4) ``(y0, y1, x0, x1)`` the region pasted from the partner (empty box: a blend, or unmixed)."""

    lam: np.ndarray
    boxes: np.ndarray


class Mixer:
    """timm's Mixup/CutMix for the trainer's batches; see the module docstring for what differs.

    Args:
        mixup_alpha: Mixup's Beta(alpha, alpha); 0 turns Mixup off (timm's ``--mixup``).
        cutmix_alpha: CutMix's Beta(alpha, alpha); 0 turns CutMix off (``--cutmix``).
        cutmix_minmax: CutMix box sides as fractions of the image, drawn uniformly in [min, max) (timm's
            ``--cutmix-minmax``); sets CutMix on with alpha 1.0, as timm does.
        prob: probability that a batch (or pair, or element) is mixed at all (``--mixup-prob``).
        switch_prob: with both on, probability of CutMix instead of Mixup (``--mixup-switch-prob``).
        mode: ``batch`` (one draw per batch), ``pair`` (per pair i, n-1-i) or ``elem`` (per image)
            (``--mixup-mode``).
        seed: the run's seed; the draws for a batch depend only on ``(seed, rank, epoch, step)``.
        rank: the process's rank (each rank mixes its own batches, as under timm's DDP).
        off_epoch: mix only the 0-based epochs before it (timm's ``--mixup-off-epoch``); 0 mixes every epoch.
    """

    def __init__(
        self,
        *,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: tuple[float, float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        seed: int = 0,
        rank: int = 0,
        off_epoch: int = 0,
    ):
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2 or not 0 <= cutmix_minmax[0] < cutmix_minmax[1] <= 1:
                raise ValueError(f"cutmix_minmax={cutmix_minmax} is invalid: two fractions 0 <= min < max <= 1")
            cutmix_alpha = 1.0
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}: alphas must be >= 0")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("Mixer needs mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax")
        if not (0 <= prob <= 1 and 0 <= switch_prob <= 1):
            raise ValueError(f"prob={prob}, switch_prob={switch_prob}: probabilities must be in [0, 1]")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is invalid: choose one of {', '.join(MODES)}")
        self.mixup_alpha, self.cutmix_alpha, self.cutmix_minmax = mixup_alpha, cutmix_alpha, cutmix_minmax
        self.prob, self.switch_prob, self.mode = prob, switch_prob, mode
        self.seed, self.rank, self.off_epoch = seed, rank, off_epoch

    def active(self, epoch: int) -> bool:
        """Whether 0-based ``epoch`` is mixed."""
        return not 0 < self.off_epoch <= epoch

    def describe(self) -> str:
        """One line for the run log."""
        kinds = [f"Mixup alpha {self.mixup_alpha:g}"] if self.mixup_alpha > 0 else []
        if self.cutmix_alpha > 0:
            box = f"boxes {self.cutmix_minmax[0]:g}-{self.cutmix_minmax[1]:g}" if self.cutmix_minmax else ""
            kinds.append(f"CutMix {box or f'alpha {self.cutmix_alpha:g}'}")
        switch = f", CutMix with probability {self.switch_prob:g}" if len(kinds) == 2 else ""
        off = f", epochs 1-{self.off_epoch} only" if self.off_epoch else ""
        return (
            f"mixing batches: {' or '.join(kinds)}{switch}, per {self.mode}, probability {self.prob:g}{off}; each "
            "sample's loss for DaP is its own label's loss in the images that carry it"
        )

    def draw(self, n: int, height: int, width: int, *, epoch: int, step: int) -> MixParams:
        """The parameters for a batch of ``n`` images of ``height`` x ``width`` (deterministic in its keys)."""
        rng = np.random.default_rng([self.seed % 2**32, self.rank, epoch, step])
        groups = 1 if self.mode == "batch" else (n + 1) // 2 if self.mode == "pair" else n
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rng.random(groups) < self.switch_prob
        else:
            use_cutmix = np.full(groups, self.cutmix_alpha > 0)
        ones = np.ones(groups)
        lam_cutmix = rng.beta(self.cutmix_alpha, self.cutmix_alpha, groups) if self.cutmix_alpha > 0 else ones
        lam_mixup = rng.beta(self.mixup_alpha, self.mixup_alpha, groups) if self.mixup_alpha > 0 else ones
        lam = np.where(use_cutmix, lam_cutmix, lam_mixup)
        mixed = rng.random(groups) < self.prob
        lam = np.where(mixed, lam, 1.0)
        use_cutmix &= mixed
        boxes = np.zeros((groups, 4), dtype=np.int64)
        for g in np.flatnonzero(use_cutmix):
            boxes[g], lam[g] = self._box(rng, lam[g], height, width)
        if self.mode == "batch":
            lam, boxes = np.repeat(lam, n), np.repeat(boxes, n, axis=0)
        elif self.mode == "pair":  # image n-1-i takes image i's draw
            lam = np.concatenate([lam[: n // 2], lam[: (n + 1) // 2][::-1]])
            boxes = np.concatenate([boxes[: n // 2], boxes[: (n + 1) // 2][::-1]])
        if n % 2:  # the middle image of an odd batch is its own partner: nothing to mix
            lam[n // 2], boxes[n // 2] = 1.0, 0
        return MixParams(lam=lam.astype(np.float64), boxes=boxes)

    def _box(self, rng, lam: float, height: int, width: int) -> tuple[np.ndarray, float]:
        """timm's CutMix box (``rand_bbox`` / ``rand_bbox_minmax``) and the share of the image it leaves."""
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            cut_h = int(rng.integers(int(height * lo), max(int(height * hi), int(height * lo) + 1)))
            cut_w = int(rng.integers(int(width * lo), max(int(width * hi), int(width * lo) + 1)))
            y0, x0 = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
            y1, x1 = y0 + cut_h, x0 + cut_w
        else:
            ratio = np.sqrt(1.0 - lam)
            cut_h, cut_w = int(height * ratio), int(width * ratio)
            cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
            y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + (cut_h + 1) // 2, 0, height)
            x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + (cut_w + 1) // 2, 0, width)
        area = (y1 - y0) * (x1 - x0)
        return np.array([y0, y1, x0, x1]), 1.0 - area / float(height * width)

    def __call__(self, images: torch.Tensor, *, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix ``images`` (N, C, H, W); returns the mixed batch (same dtype and memory format; ``images`` itself,
        unchanged, when the draws mix nothing) and ``lam`` (N,) float32 on the images' device, for
        :func:`mixed_losses`."""
        n, _, height, width = images.shape
        params = self.draw(n, height, width, epoch=epoch, step=step)
        return mix_images(images, params), to_device(params.lam, images.device, torch.float32)


def to_device(values: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small host array on ``device`` without a host-device sync: on CUDA through pinned memory, asynchronously
    (a pageable copy would wait for every kernel queued before it)."""
    t = torch.as_tensor(np.ascontiguousarray(values), dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def mix_images(images: torch.Tensor, params: MixParams) -> torch.Tensor:
    """Apply ``params`` to ``images``: image i blends in (or has pasted in) image n-1-i of the *unmixed* batch.
    ``images`` is never written to; it is returned itself when nothing is mixed."""
    if not images.is_floating_point():
        raise TypeError(f"mix_images takes a floating-point batch (normalised images), not {images.dtype}")
    pasted = params.boxes[:, 1] > params.boxes[:, 0]  # CutMix; the others blend (lam 1.0: unmixed)
    blend = np.where(pasted, 1.0, params.lam)
    if not pasted.any() and (blend == 1.0).all():
        return images
    partner = images.flip(0)
    if (blend < 1.0).any():
        w = to_device(blend, images.device, images.dtype).view(-1, 1, 1, 1)
        out = images * w + partner * (1 - w)
    else:
        out = images.clone()
    rows = np.flatnonzero(pasted)
    if len(rows) == len(pasted) and (params.boxes == params.boxes[0]).all():  # batch mode: one box for all
        rows = [slice(None)]
    for i in rows:
        y0, y1, x0, x1 = (int(v) for v in params.boxes[0 if isinstance(i, slice) else i])
        out[i, :, y0:y1, x0:x1] = partner[i, :, y0:y1, x0:x1]
    return out


class MixedLosses(NamedTuple):
    images: torch.Tensor  # (N,) each image's soft-target loss (timm's SoftTargetCrossEntropy per image)
    own: torch.Tensor  # (N,) each sample's own label's loss, averaged over the images that carry it (to rank by)
    trained: torch.Tensor  # (N,) what to average for backward: ``images``, or with loss weights applied per label


def mixed_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lam: torch.Tensor,
    *,
    smoothing: float = 0.0,
    weights: torch.Tensor | None = None,
) -> MixedLosses:
    """The per-image losses to train on and the per-sample losses to rank by, for a batch mixed with its reverse.

    Args:
        logits: (N, classes); computed in float32 here.
        targets: (N,) class indices of the *unmixed* samples, in batch order.
        lam: (N,) each image's own share (1.0: unmixed), as :class:`Mixer` returns it.
        smoothing: label smoothing, as torch's ``label_smoothing`` (timm's ``mixup_target`` is the same target).
        weights: (N,) per-sample loss weights (InfoBatch's), or None: each label's terms are scaled by the weight
            of the sample whose label it is, in its own image and in its partner's.

    Returns:
        :class:`MixedLosses`. ``own`` is the module docstring's; in batch and pair mode ``own.sum() ==
        images.sum()``; with ``lam`` all ones all three are ``F.cross_entropy``'s (``trained`` times ``weights``).
    """
    logp = logits.float().log_softmax(dim=1)
    uniform = -logp.mean(dim=1)  # the smoothing term: cross-entropy against the uniform distribution
    rows = torch.arange(logp.shape[0], device=logp.device)

    def against(classes: torch.Tensor) -> torch.Tensor:  # L_i(c_i) for every image i
        return (1.0 - smoothing) * -logp[rows, classes] + smoothing * uniform

    lam = lam.to(logp.device, logp.dtype)
    own_term = against(targets)
    own_label = lam * own_term  # image i, its own label
    partner_label = (1.0 - lam) * against(targets.flip(0))  # image i, its partner's label: owned by sample n-1-i
    share = lam + (1.0 - lam).flip(0)  # how much of sample j's label was trained, over both images
    # a label with (almost) no weight anywhere (CutMix pasted all of it over, its partner unmixed): its own image
    own = torch.where(share > 1e-6, (own_label + partner_label.flip(0)) / share.clamp_min(1e-6), own_term)
    images = own_label + partner_label
    if weights is None:
        return MixedLosses(images=images, own=own, trained=images)
    weights = weights.to(logp.device, logp.dtype)
    return MixedLosses(images=images, own=own, trained=own_label * weights + partner_label * weights.flip(0))
