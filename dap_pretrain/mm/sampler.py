"""``DaPMMSampler``: the DaP sampler as an mmengine data sampler (``train_dataloader.sampler``).

Who calls what, and when:

1. mmengine's ``Runner.build_dataloader`` builds it with ``dataset=`` and ``seed=`` (the runner's seed, the same on
   every rank) from ``train_dataloader.sampler = dict(type='DaPMMSampler')``. Until configured it yields all data.
2. :class:`~dap_pretrain.mm.hook.DaPHook` calls :meth:`DaPMMSampler.configure` once in ``before_run`` with the
   resolved ``dap`` block, and from then on drives it exactly as the timm trainer drives
   :class:`~dap_pretrain.data.sampler.DaPSampler` (``set_epoch`` before each epoch, ``end_epoch`` after it on every
   rank); :class:`~dap_pretrain.mm.head.DaPClsHead` calls ``record`` in each training forward.

Everything else (subset choice, shuffling, sharding, state) is ``DaPSampler``'s: one engine, two front ends.
"""

from __future__ import annotations

from mmengine.dist import get_dist_info, sync_random_seed
from mmengine.registry import DATA_SAMPLERS

from dap_pretrain.data.sampler import SELECT_STRATEGIES, DaPSampler
from dap_pretrain.schedule import DaPConfig, DaPSchedule


@DATA_SAMPLERS.register_module()
class DaPMMSampler(DaPSampler):
    """:class:`DaPSampler` over an mmengine dataset, identical on every rank.

    Args:
        dataset: the training dataset (its length is N; its ``sample_idx`` are the indices this sampler yields).
        shuffle: reshuffle the subset every epoch with ``torch.Generator(seed + epoch)``.
        seed: ``None`` draws one seed on rank 0 and broadcasts it, as mmengine's ``DefaultSampler`` does.
        drop_last: trim each epoch to a multiple of the world size instead of padding with repeats.
    """

    def __init__(self, dataset, *, shuffle: bool = True, seed: int | None = None, drop_last: bool = False):
        rank, world = get_dist_info()
        super().__init__(
            len(dataset),
            config=None,
            num_replicas=world,
            rank=rank,
            shuffle=shuffle,
            seed=sync_random_seed() if seed is None else seed,
            drop_last=drop_last,
        )

    def configure(self, *, config: DaPConfig | None, select: str, seed: int | None = None) -> None:
        """Set the schedule before the first epoch (``DaPHook.before_run``); a resumed state is loaded after this."""
        if select not in SELECT_STRATEGIES:
            raise ValueError(f"select={select!r} is invalid: must be one of {', '.join(SELECT_STRATEGIES)}")
        if bool(self.recorder.seen().any()) or self.schedule is not None and self.schedule.last_epoch:
            raise RuntimeError("DaPMMSampler.configure() called after training started; call it in before_run")
        self.config = config
        self.select = select
        self.schedule = DaPSchedule(config) if config is not None else None
        if seed is not None:
            self.seed = int(seed)
