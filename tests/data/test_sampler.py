"""DaPSampler / LossRecorder / select_subset: selection, iteration, edge cases, resume."""

import math

import pytest
import torch

from dap_pretrain.data.sampler import DaPSampler, LossRecorder, NonFiniteLossError, select_subset
from dap_pretrain.schedule import DaPConfig, plan


def _loss(index: torch.Tensor, epoch: int) -> torch.Tensor:
    """A deterministic, epoch-dependent pseudo-loss with no ties."""
    return torch.sin(index.double() * 12.9898 + epoch * 78.233).abs() + index.double() * 1e-9


def _run(sampler, epochs, start=0):
    """Train-like loop: iterate, record every yielded sample's loss, end the epoch. Returns subsets."""
    subsets = []
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(sampler))
        for chunk in idx.split(7):
            sampler.record(chunk, _loss(chunk, epoch))
        sampler.end_epoch()
        subsets.append(sampler.subset.clone())
    return subsets


def test_hard_keeps_exactly_top_p():
    current = torch.arange(0, 200, 2)
    losses = torch.rand(200, generator=torch.Generator().manual_seed(0)).double()
    kept = select_subset(current, losses, keep=0.3, strategy="hard")
    expected = current[losses[current].argsort(descending=True)[:30]].sort().values
    assert torch.equal(kept, expected)


def test_hard_ties_and_unseen():
    current = torch.arange(6)
    losses = torch.tensor([1.0, 5.0, 5.0, float("nan"), 5.0, 0.0], dtype=torch.float64)
    # 3 kept: the unseen sample 3 ranks hardest, then ties at 5.0 go to the lower indices 1, 2.
    assert select_subset(current, losses, keep=0.5, strategy="hard").tolist() == [1, 2, 3]


def test_random_and_none_counts():
    current = torch.arange(1000)
    losses = torch.rand(1000).double()
    g = torch.Generator().manual_seed(1)
    rnd = select_subset(current, losses, keep=0.9, strategy="random", generator=g)
    assert rnd.numel() == 900 and rnd.unique().numel() == 900
    hard = select_subset(current, losses, keep=0.9, strategy="hard")
    assert not torch.equal(rnd, hard)
    assert torch.equal(select_subset(current, losses, keep=0.9, strategy="none"), current)


@pytest.mark.parametrize("select", ["hard", "random", "none"])
def test_subset_sizes_match_planner(select):
    cfg = DaPConfig(epochs=12, warmup=2, interval=2, keep=0.7, active=6, reuse=(8,))
    # the subset chosen at the end of epoch e is the one epoch e + 1 trains on
    sizes = [s.numel() for s in _run(DaPSampler(101, config=cfg, select=select, seed=3), 12)][:-1]
    expected = [101] * 11 if select == "none" else plan(cfg, 101).subset_sizes[1:]
    assert sizes == expected


def test_iter_is_idempotent_and_len_matches():
    s = DaPSampler(50, config=DaPConfig(epochs=4, warmup=1, interval=1, keep=0.5), num_replicas=3, rank=1, seed=5)
    s.set_epoch(2)
    assert list(s) == list(s) and len(list(s)) == len(s) == math.ceil(50 / 3)
    s.set_epoch(3)
    first = list(s)
    s.set_epoch(2)
    assert first != list(s)


def test_shards_cover_subset_with_padding_and_drop_last():
    for drop_last in (False, True):
        shards = [list(DaPSampler(10, num_replicas=4, rank=r, drop_last=drop_last)) for r in range(4)]
        flat = sum(shards, [])
        assert all(len(x) == len(shards[0]) for x in shards)
        assert len(flat) == (8 if drop_last else 12)
        if not drop_last:
            assert set(flat) == set(range(10))


def test_recorder_mean_of_duplicates_and_nonfinite():
    r = LossRecorder(5)
    r.record(torch.tensor([1, 2, 1]), torch.tensor([1.0, 4.0, 3.0]))
    m = r.mean_losses()
    assert m[1] == 2.0 and m[2] == 4.0 and torch.isnan(m[0])
    with pytest.raises(NonFiniteLossError, match="sample index 4"):
        r.record(torch.tensor([3, 4]), torch.tensor([1.0, float("nan")]))
    skip = LossRecorder(5, nonfinite="skip")
    skip.record(torch.tensor([3, 4]), torch.tensor([1.0, float("inf")]))
    assert skip.seen().tolist() == [False, False, False, True, False]
    with pytest.raises(ValueError, match="unreduced"):
        r.record(torch.tensor([1, 2]), torch.tensor(1.0))


def test_resume_reproduces_subsets_exactly():
    cfg = DaPConfig(epochs=16, warmup=2, interval=2, keep=0.8, active=6, reuse=(9,))
    full = _run(DaPSampler(97, config=cfg, seed=11), 16)
    for stop in (3, 5, 9, 12):
        a = DaPSampler(97, config=cfg, seed=11)
        _run(a, stop)
        state = a.state_dict()
        torch.save(state, "/dev/null")  # plain tensors/ints: serialisable
        b = DaPSampler(97, config=cfg, seed=11)
        b.load_state_dict(state)
        assert [x.tolist() for x in _run(b, 16, start=stop)] == [x.tolist() for x in full[stop:]]


def test_resume_refuses_other_parameters():
    a = DaPSampler(20, config=DaPConfig(epochs=4, warmup=1, keep=0.5))
    with pytest.raises(ValueError, match="keep 0.5 \\(this run: 0.6\\)"):
        DaPSampler(20, config=DaPConfig(epochs=4, warmup=1, keep=0.6)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="samples"):
        DaPSampler(21, config=DaPConfig(epochs=4, warmup=1, keep=0.5)).load_state_dict(a.state_dict())
