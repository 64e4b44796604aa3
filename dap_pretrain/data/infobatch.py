"""InfoBatch's pruning policy as a :class:`~dap_pretrain.data.sampler.DaPSampler`: same hooks, same trainer.

InfoBatch (Qin et al., ICLR 2024, "InfoBatch: Lossless training speed up by unbiased dynamic data pruning"),
implemented from the paper's description: each sample's score is its most recent training loss; every epoch a
random fraction ``r`` of the samples scoring strictly below the mean score is left out, the kept below-mean
samples have their loss scaled by ``1 / (1 - r)`` so the expected gradient is unchanged, and the last
``1 - delta`` of the epochs train on all data without rescaling ("annealing").

Who calls what, and when (the :class:`DaPSampler` contract plus one hook):

1. ``sampler.set_epoch(epoch)`` before each epoch (0-based).
2. ``w = sampler.loss_weights(indices)`` each step; ``None`` means every weight is 1 this epoch, else the
   trainer backpropagates ``(losses * w).mean()``.
3. ``sampler.record(indices, losses)`` with the UNSCALED per-sample losses (they are the scores).
4. ``sampler.end_epoch()`` once after the epoch's last batch, on every rank (one collective).

Deviations from the paper, each deliberate:

* ``target_compute`` (optional) calibrates ``r`` online so that a run trains ``target_compute * epochs * N``
  samples in total, to compare with another policy at equal compute. The mechanism (uniformly random among
  the below-mean samples, ``1 / (1 - r)`` rescale, full-data annealing) is InfoBatch's; only ``r`` moves from
  a constant to a per-epoch value, capped at 0.95 so no sample's weight exceeds 20.
* The pruned count is ``floor(r * candidates)`` and the rescale is the paper's ``1 / (1 - r)``; the exactly
  unbiased ``candidates / (candidates - pruned)`` differs from it by less than ``1 / ((1 - r) * candidates)``.
* A sample that was never trained (only possible with ``drop_last``) has no score: it is excluded from the
  mean and never pruned, as :class:`DaPSampler` keeps unseen samples (no evidence that it is easy).
* The subset and weights are decided at ``end_epoch`` from losses merged over all ranks, rather than inside
  the data loader, so all ranks agree and a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import math

import torch

from dap_pretrain.data.sampler import DaPSampler, EpochReport

_logger = logging.getLogger(__name__)

PRUNE, KEEP, ANNEAL = "prune", "keep", "anneal"
MAX_RATIO = 0.95  # cap on the calibrated r: the 1/(1-r) rescale stays <= 20, so no few samples dominate a batch
_PRUNE_SALT = 0x1B07  # separates the pruning stream from the shuffle stream (seed + epoch) of the same epoch


class InfoBatchSampler(DaPSampler):
    """Yields this rank's shard of the InfoBatch subset of the current epoch; see the module docstring.

    Sharding, padding, shuffling, ``record`` and the loss recorder are :class:`DaPSampler`'s (with no DaP
    schedule). ``self.subset`` holds the sorted dataset indices of the current epoch, ``self.weights`` the
    (N,) float32 loss weights of the current epoch, ``self.scores`` the (N,) float64 scores (NaN: never
    trained), and ``self.ratio_history[e]`` the ratio ``r`` chosen at the end of epoch ``e`` (0-based), i.e.
    applied to epoch ``e + 1``; it is 0.0 for epochs whose next epoch trains on all data.

    Args:
        num_samples: dataset size N.
        epochs: total training epochs E; pruning runs while the next epoch is below ``round(delta * E)``.
        ratio: InfoBatch's ``r``, the fraction of below-mean samples left out each pruning epoch.
        delta: fraction of the epochs in the pruning phase; the rest train on all data with weight 1.
        target_compute: if given, the fraction F of ``E * N`` samples the run should train in total; then ``r``
            is recalibrated every epoch (``ratio`` is ignored) instead of staying constant.
        num_replicas, rank, shuffle, seed, drop_last, nonfinite: as for :class:`DaPSampler`.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        epochs: int,
        ratio: float = 0.5,
        delta: float = 0.875,
        target_compute: float | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        nonfinite: str = "raise",
    ):
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs={epochs!r} is invalid: must be an integer >= 1")
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"infobatch ratio={ratio!r} is invalid: must be in [0, 1) (the paper uses 0.5)")
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"infobatch delta={delta!r} is invalid: must be in (0, 1] (the paper uses 0.875)")
        if target_compute is not None and not 0.0 < target_compute <= 1.0:
            raise ValueError(
                f"target_compute={target_compute!r} is invalid: must be in (0, 1] (a fraction of epochs * N), or None"
            )
        super().__init__(
            num_samples,
            config=None,
            select="none",
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            nonfinite=nonfinite,
        )
        self.epochs = epochs
        self.ratio = float(ratio)
        self.delta = float(delta)
        self.target_compute = None if target_compute is None else float(target_compute)
        self.anneal_start = round(self.delta * epochs)  # first 0-based epoch of the all-data phase
        self.scores = torch.full((num_samples,), math.nan, dtype=torch.float64)
        self.weights = torch.ones(num_samples, dtype=torch.float32)
        self.ratio_history: list[float] = []
        self.samples_trained = 0  # sum of the subset sizes of the epochs ended so far
        self._uniform = True  # every weight is 1 this epoch
        self._device_weights: torch.Tensor | None = None  # self.weights on the last device asked for

    def _params(self) -> dict:
        return {
            "epochs": self.epochs,
            "ratio": self.ratio,
            "delta": self.delta,
            "target_compute": self.target_compute,
        }

    # -- training-side hooks -----------------------------------------------------------------------
    def loss_weights(self, indices: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights of the current epoch for a batch's dataset indices, or ``None`` if all are 1.

        Called by the trainer each step, before the backward pass. The result is float32 on ``indices.device``;
        the weight vector is copied to that device once per epoch and cached, so a GPU step does not synchronise.
        """
        if self._uniform:
            return None
        indices = torch.as_tensor(indices)
        if self._device_weights is None or self._device_weights.device != indices.device:
            self._device_weights = self.weights.to(indices.device, non_blocking=True)
        return self._device_weights[indices.reshape(-1).long()]

    def end_epoch(self) -> EpochReport:
        """Call once after the last batch of epoch ``self.epoch`` on every rank (collective).

        Merges the ranks' losses, updates the scores of the samples trained this epoch and sets the subset and
        loss weights of the next epoch. Every rank draws the same pruned set from the same merged scores.
        """
        self.recorder.synchronize()
        before = self.subset.numel()
        seen_mask = self.recorder.seen()
        seen = int(seen_mask[self.subset].sum())
        self.scores[seen_mask] = self.recorder.mean_losses()[seen_mask]
        self.recorder.reset()
        self.samples_trained += before
        if self.epoch + 1 >= self.anneal_start:
            event, r = ANNEAL, 0.0
            self.subset = self.full_subset.clone()
            self.weights = torch.ones(self.num_samples, dtype=torch.float32)
        else:
            event, r = self._prune_next()
        self.ratio_history.append(r)
        self._uniform = event != PRUNE
        self._device_weights = None
        _logger.debug("epoch %d: %s r=%.4f subset %d -> %d", self.epoch + 1, event, r, before, self.subset.numel())
        return EpochReport(
            epoch=self.epoch + 1, event=event, size_before=before, size_after=self.subset.numel(), seen=seen
        )

    def _prune_next(self) -> tuple[str, float]:
        """Sets subset and weights of pruning epoch ``self.epoch + 1``; returns the event and the ratio used."""
        scored = ~torch.isnan(self.scores)
        candidates = torch.nonzero(scored & (self.scores < self.scores[scored].mean())).squeeze(1)
        r = self._next_ratio(candidates.numel())
        k = math.floor(r * candidates.numel())
        self.weights = torch.ones(self.num_samples, dtype=torch.float32)
        if k == 0:
            self.subset = self.full_subset.clone()
            return KEEP, r
        g = torch.Generator().manual_seed(self.seed + self.epoch + _PRUNE_SALT)
        pruned = candidates[torch.randperm(candidates.numel(), generator=g)[:k]]
        self.weights[candidates] = 1.0 / (1.0 - r)
        self.weights[pruned] = 1.0  # never read: pruned samples are not in the subset
        keep = torch.ones(self.num_samples, dtype=torch.bool)
        keep[pruned] = False
        self.subset = self.full_subset[keep[self.full_subset]]
        return PRUNE, r

    def fewest_samples(self) -> int:
        """The fewest samples a pruning epoch can keep, whatever the losses: at most ``r`` (``MAX_RATIO`` with
        ``target_compute``) of the samples below the mean score are left out (all N of them at worst: equal scores
        can round below their own mean). What a ``--drop-last`` batch size is checked against before training."""
        r = MAX_RATIO if self.target_compute is not None else self.ratio
        return self.num_samples - math.floor(r * self.num_samples)

    def _next_ratio(self, num_candidates: int) -> float:
        """InfoBatch's constant ``ratio``, or with ``target_compute`` the r that spreads the remaining budget.

        Budget: ``F * E * N`` samples minus those already trained minus ``N`` per annealing epoch, split evenly
        over the pruning epochs left (``self.epoch + 1 .. anneal_start - 1``); r prunes the shortfall from the
        below-mean candidates, clamped to ``[0, MAX_RATIO]``.
        """
        if self.target_compute is None:
            return self.ratio
        if num_candidates == 0:
            return 0.0
        n = self.num_samples
        pruning_left = self.anneal_start - (self.epoch + 1)
        budget = self.target_compute * self.epochs * n - self.samples_trained - n * (self.epochs - self.anneal_start)
        prune_next = (pruning_left * n - budget) / pruning_left
        return min(max(prune_next / num_candidates, 0.0), MAX_RATIO)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """:class:`DaPSampler`'s state plus InfoBatch's; plain tensors/numbers only (``weights_only=True`` safe)."""
        return {
            **super().state_dict(),
            "infobatch": {
                **self._params(),
                "scores": self.scores.clone(),
                "weights": self.weights.clone(),
                "ratio_history": [float(r) for r in self.ratio_history],
                "samples_trained": int(self.samples_trained),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("infobatch")
        if saved is None:
            raise ValueError("sampler state has no InfoBatch state (saved by DaPSampler?); resume with the same policy")
        params = {key: saved[key] for key in self._params()}
        if params != self._params():
            raise ValueError(
                f"sampler state was saved with InfoBatch parameters {params}, this run has {self._params()}; "
                "resume with the same epochs/ratio/delta/target_compute"
            )
        super().load_state_dict(state)
        self.scores = saved["scores"].to(torch.float64).clone()
        self.weights = saved["weights"].to(torch.float32).clone()
        self.ratio_history = [float(r) for r in saved["ratio_history"]]
        self.samples_trained = int(saved["samples_trained"])
        self._uniform = bool((self.weights == 1.0).all())
        self._device_weights = None
