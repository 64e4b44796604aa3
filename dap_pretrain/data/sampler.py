"""Loss-driven Drop-and-Pick sampler: a drop-in for ``DistributedSampler`` that trains on a subset.

Who calls what, and when (the whole contract):

1. ``sampler.set_epoch(epoch)`` before each epoch (0-based, as timm/torch do).
2. ``sampler.record(indices, losses)`` after each training forward pass, with the batch's dataset
   indices (they travel in the batch, see :class:`~dap_pretrain.data.dataset.IndexedDataset`) and
   the unreduced per-sample losses. No extra forward pass.
3. ``sampler.end_epoch()`` once after the epoch's last batch, on EVERY rank: one collective merges
   the ranks' losses, then every rank computes the same next subset from the same numbers.

``__iter__`` only reads state: it may be called any number of times per epoch (torch's
BatchSampler does) and always yields the same indices for a given epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from dap_pretrain.errors import DapError
from dap_pretrain.schedule import DROP, REUSE, DaPConfig, DaPSchedule, keep_count

_logger = logging.getLogger(__name__)

SELECT_STRATEGIES = ("hard", "random", "none")
_RANDOM_SALT = 0x5EED  # separates the random-drop stream from the shuffle stream of the same epoch


class NonFiniteLossError(DapError, ValueError):
    """A per-sample loss was NaN or inf; the message names the dataset index and, when known, the epoch.

    Attributes:
        index: the first offending dataset index.
        value: its loss (NaN or +-inf).
        epoch: the 1-based epoch it was recorded in, or None where no sampler set it.
    """

    def __init__(self, index: int, value: float, epoch: int | None = None):
        self.index, self.value, self.epoch = index, value, epoch
        where = f" in epoch {epoch}" if epoch is not None else ""
        super().__init__(
            f"loss of sample index {index} is {value}{where}: training diverged; lower the learning rate "
            "(--lr, or a longer --warmup-epochs) or clip gradients (--clip-grad 1.0), or check that sample"
        )

    def __reduce__(self):  # pickles (worker/process boundaries) with the fields, not the message
        return type(self), (self.index, self.value, self.epoch)


class LossRecorder:
    """Per-sample training losses of the current epoch, keyed by dataset index.

    Holds two dense float64 vectors of length N (sum of losses, number of times seen), so memory
    is O(N) and merging ranks is one ``all_reduce`` of a (2, N) tensor. A sample seen twice in an
    epoch (DDP pads the last shard with duplicates) gets the mean of its losses; a subset member
    never seen (dropped by ``drop_last``) has no loss, and :func:`select_subset` keeps it, since
    there is no evidence it is easy.

    Args:
        num_samples: dataset size N.
        nonfinite: ``'raise'`` (default) raises :class:`NonFiniteLossError` naming the first
            offending index; ``'skip'`` leaves such samples unrecorded for this epoch.

    Attributes:
        epoch: the 1-based epoch being recorded, named in :class:`NonFiniteLossError`; set by
            :meth:`DaPSampler.set_epoch`, None until then.
    """

    def __init__(self, num_samples: int, *, nonfinite: str = "raise"):
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r} is invalid: must be 'raise' or 'skip'")
        self.num_samples = num_samples
        self.nonfinite = nonfinite
        self.epoch: int | None = None
        self._sums = torch.zeros(num_samples, dtype=torch.float64)
        self._counts = torch.zeros(num_samples, dtype=torch.float64)

    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Add one batch: ``indices`` (B,) int dataset indices, ``losses`` (B,) unreduced losses.

        Accumulates on the losses' device (the two vectors follow it there), so a GPU step is not
        forced to synchronise; the non-finite check then runs once per epoch in :meth:`synchronize`
        unless ``nonfinite='skip'`` asks for per-batch filtering.
        """
        losses = torch.as_tensor(losses).detach().reshape(-1)
        indices = torch.as_tensor(indices).reshape(-1).to(losses.device, torch.int64, non_blocking=True)
        if indices.numel() != losses.numel():
            raise ValueError(
                f"record() got {indices.numel()} indices but {losses.numel()} losses; "
                "pass the unreduced loss (reduction='none'), one value per sample"
            )
        if self._sums.device != losses.device:
            self._sums, self._counts = self._sums.to(losses.device), self._counts.to(losses.device)
        losses = losses.to(torch.float64)
        if self.nonfinite == "skip":
            finite = torch.isfinite(losses)
            indices, losses = indices[finite], losses[finite]
        elif losses.device.type == "cpu":
            self._raise_if_nonfinite(indices, losses)
        self._sums.index_add_(0, indices, losses)
        self._counts.index_add_(0, indices, torch.ones_like(losses))

    def _raise_if_nonfinite(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        bad = ~torch.isfinite(losses)
        if bool(bad.any()):
            raise NonFiniteLossError(int(indices[bad][0]), float(losses[bad][0]), self.epoch)

    def synchronize(self) -> None:
        """Sum every rank's recordings into every rank (one collective) and bring them to the CPU.

        Without a process group only the move and the non-finite check happen.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            both = torch.stack([self._sums, self._counts]).to(device)
            dist.all_reduce(both)
            self._sums, self._counts = both[0], both[1]
        self._sums, self._counts = self._sums.cpu().clone(), self._counts.cpu().clone()
        if self.nonfinite == "raise":
            self._raise_if_nonfinite(torch.arange(self.num_samples), self._sums)

    def mean_losses(self) -> torch.Tensor:
        """(N,) mean loss per sample this epoch; NaN where the sample was not seen."""
        return torch.where(self._counts > 0, self._sums / self._counts.clamp(min=1), torch.nan)

    def seen(self) -> torch.Tensor:
        return self._counts > 0

    def reset(self) -> None:
        self._sums = torch.zeros(self.num_samples, dtype=torch.float64)
        self._counts = torch.zeros(self.num_samples, dtype=torch.float64)

    def state_dict(self) -> dict:
        return {"sums": self._sums.cpu().clone(), "counts": self._counts.cpu().clone(), "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict) -> None:
        if state["sums"].numel() != self.num_samples:
            raise ValueError(
                f"recorder state is for {state['sums'].numel()} samples, this dataset has {self.num_samples}"
            )
        self._sums = state["sums"].to(torch.float64).clone()
        self._counts = state["counts"].to(torch.float64).clone()
        self.nonfinite = state.get("nonfinite", self.nonfinite)


def select_subset(
    current: torch.Tensor, losses: torch.Tensor, *, keep: float, strategy: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Choose the next subset from ``current`` (sorted int64 dataset indices).

    ``hard`` keeps the ``keep_count(len(current), keep)`` members with the highest loss. Ties are
    broken by the lower dataset index, and members without a loss (NaN: not seen this epoch) rank
    above all others. ``random`` keeps the same number uniformly at random using ``generator``;
    ``none`` keeps everything. The result is sorted, so it does not depend on sort stability.
    """
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(f"select={strategy!r} is invalid: must be one of {', '.join(SELECT_STRATEGIES)}")
    if strategy == "none":
        return current.clone()
    n = current.numel()
    k = keep_count(n, keep)
    mask = torch.zeros(n, dtype=torch.bool)
    if strategy == "random":
        mask[torch.randperm(n, generator=generator)[:k]] = True
        return current[mask]
    # O(N) instead of a full sort (a 1.28M-element sort costs ~0.25 s on 2 cores): find the k-th
    # largest score, keep everything above it, and fill the remaining places with the lowest-index
    # members that equal it. Masking keeps the result in ascending index order.
    scores = losses[current].float().nan_to_num_(nan=math.inf)  # losses are float32 at the source
    threshold = torch.kthvalue(scores, n - k + 1).values
    mask = scores >= threshold
    extra = int(mask.sum()) - k
    if extra:  # ties at the threshold: drop the highest-index ones (rare with real-valued losses)
        ties = torch.nonzero(scores == threshold).squeeze(1)
        mask[ties[-extra:]] = False
    return current[mask]


@dataclass
class EpochReport:
    """What :meth:`DaPSampler.end_epoch` did: the event, sizes, and the losses it ranked by."""

    epoch: int  # 1-based epoch that just ended
    event: str  # 'warm-up', 'keep', 'drop' or 'reuse'
    size_before: int
    size_after: int
    seen: int  # subset members with a recorded loss this epoch
    losses: torch.Tensor | None = None  # mean losses of the ranked subset (drop epochs only)


class DaPSampler(Sampler[int]):
    """Yields this rank's shard of the current DaP subset, reshuffled each epoch.

    Same knobs as :class:`torch.utils.data.DistributedSampler` (``num_replicas``, ``rank``,
    ``shuffle``, ``seed``, ``drop_last``, ``set_epoch``); ``num_replicas``/``rank`` default to the
    process group when one is initialised, else 1/0. Each epoch the subset is permuted by a local
    ``torch.Generator`` seeded with ``seed + epoch`` (the same on every rank), padded (or, with
    ``drop_last``, trimmed) to a multiple of ``num_replicas`` and sharded ``rank::num_replicas``.

    Args:
        num_samples: dataset size N.
        config: the DaP schedule; ``None`` trains on ``initial_subset`` (default all) every epoch.
        select: ``hard`` (DaP), ``random`` (same sizes, uniform choice) or ``none`` (no drops).
        initial_subset: indices to start from, e.g. a fixed random subset baseline; default all.
        nonfinite: passed to :class:`LossRecorder`.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        config: DaPConfig | None = None,
        select: str = "hard",
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        initial_subset: torch.Tensor | None = None,
        nonfinite: str = "raise",
    ):
        if select not in SELECT_STRATEGIES:
            raise ValueError(f"dap-select={select!r} is invalid: must be one of {', '.join(SELECT_STRATEGIES)}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r} is invalid: must be an integer >= 1 (is the dataset empty?)")
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank={self.rank} is invalid: must be in [0, {self.num_replicas - 1}]")
        self.num_samples = num_samples
        self.config = config
        self.select = select
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.schedule = DaPSchedule(config) if config is not None else None
        self.recorder = LossRecorder(num_samples, nonfinite=nonfinite)
        full = torch.arange(num_samples, dtype=torch.int64)
        self.full_subset = (
            full if initial_subset is None else torch.as_tensor(initial_subset, dtype=torch.int64).sort().values
        )
        self.subset = self.full_subset.clone()
        self.epoch = 0

    # -- iteration (read-only) -------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Set the 0-based epoch about to run; decides the shuffle order."""
        self.epoch = int(epoch)
        self.recorder.epoch = self.epoch + 1  # named, 1-based like the logs, if a loss is not finite

    def _padded_order(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = self.subset[torch.randperm(self.subset.numel(), generator=g)]
        else:
            order = self.subset
        n, r = order.numel(), self.num_replicas
        if self.drop_last:
            return order[: (n // r) * r]
        total = math.ceil(n / r) * r
        if total > n:  # pad by repeating from the front, as DistributedSampler does
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        return order

    def indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, in order, as an int64 tensor (what ``__iter__`` yields)."""
        return self._padded_order()[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        yield from self.indices().tolist()

    def __len__(self) -> int:
        n, r = self.subset.numel(), self.num_replicas
        return n // r if self.drop_last else math.ceil(n / r)

    # -- training-side hooks -----------------------------------------------------------------------
    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Record a batch's unreduced training losses against its dataset indices."""
        self.recorder.record(indices, losses)

    def end_epoch(self) -> EpochReport:
        """Call once after the last batch of epoch ``self.epoch`` on every rank (collective).

        Merges the ranks' losses, advances the schedule and sets the subset for the next epoch.
        """
        self.recorder.synchronize()
        epoch = self.epoch + 1  # the schedule counts epochs from 1, like the paper
        before = self.subset.numel()
        seen = int(self.recorder.seen()[self.subset].sum())
        event, losses = "keep", None
        if self.schedule is not None:
            event = self.schedule.step(epoch)
            if event == DROP:
                mean = self.recorder.mean_losses()
                losses = mean[self.subset].float()
                g = torch.Generator().manual_seed(self.seed + epoch + _RANDOM_SALT)
                self.subset = select_subset(self.subset, mean, keep=self.config.keep, strategy=self.select, generator=g)
            elif event == REUSE:
                self.subset = self.full_subset.clone()
        if seen < before and event == DROP:
            _logger.info(
                "epoch %d: %d of %d subset samples had no loss (drop_last); kept as hard", epoch, before - seen, before
            )
        self.recorder.reset()
        return EpochReport(
            epoch=epoch, event=event, size_before=before, size_after=self.subset.numel(), seen=seen, losses=losses
        )

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors/ints/strings only; safe for ``torch.load(weights_only=True)``."""
        return {
            "num_samples": self.num_samples,
            "epoch": self.epoch,
            "seed": self.seed,
            "select": self.select,
            "subset": self.subset.clone(),
            "full_subset": self.full_subset.clone(),
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "config": self.config.to_dict() if self.config is not None else None,
            "recorder": self.recorder.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; the same dataset size and DaP parameters are required.

        Raises:
            ValueError: ``state`` is for another number of samples, or other DaP parameters (the message names each
                parameter that differs and both values).
        """
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples, this dataset has {self.num_samples}; "
                "resume with the same dataset"
            )
        saved = state.get("config")
        mine = self.config.to_dict() if self.config is not None else None
        if saved != mine:
            if saved is None or mine is None:
                what = f"{'no' if saved is None else 'a'} DaP schedule, this run has {'no' if mine is None else 'one'}"
            else:
                keys = [k for k in mine if saved.get(k) != mine[k]]
                what = ", ".join(f"{k} {saved.get(k)} (this run: {mine[k]})" for k in keys)
            raise ValueError(f"sampler state was saved with {what}; resume with the DaP parameters it was saved with")
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        self.subset = state["subset"].to(torch.int64).clone()
        self.full_subset = state["full_subset"].to(torch.int64).clone()
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        self.recorder.load_state_dict(state["recorder"])
