"""InfoBatchSampler: below-mean pruning, 1/(1-r) rescale, annealing, compute targeting, resume, ranks."""

import io
import math

import pytest
import torch

from dap_pretrain.data.infobatch import MAX_RATIO, InfoBatchSampler
from dap_pretrain.data.sampler import DaPSampler


def _loss(index: torch.Tensor, epoch: int) -> torch.Tensor:
    """Deterministic pseudo-loss with no ties: 70% of indices (index % 10 < 7) low, the rest high."""
    noise = torch.sin(index.double() * 12.9898 + epoch * 78.233).abs() * 0.1
    return torch.where(index % 10 < 7, 1.0, 3.0).double() + noise + index.double() * 1e-9


def _epoch(sampler, epoch, loss=_loss):
    """Train-like loop for one epoch: iterate, record every yielded sample's loss, end the epoch."""
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler))
    for chunk in idx.split(7):
        sampler.record(chunk, loss(chunk, epoch))
    return sampler.end_epoch()


def _run(sampler, epochs, start=0):
    """Per epoch after ``start``: (subset, weights, event) as they stand after end_epoch, i.e. for the next epoch."""
    out = []
    for epoch in range(start, epochs):
        report = _epoch(sampler, epoch)
        out.append((sampler.subset.clone(), sampler.weights.clone(), report.event))
    return out


def test_pruned_set_is_random_part_of_strictly_below_mean():
    n = 1000
    s = InfoBatchSampler(n, epochs=10, ratio=0.4, seed=3)
    s.set_epoch(0)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0)).double()
    s.record(torch.arange(n), scores)
    report = s.end_epoch()
    below = scores < scores.mean()
    pruned = torch.ones(n, dtype=torch.bool)
    pruned[s.subset] = False
    assert report.event == "prune" and report.size_before == n and report.size_after == s.subset.numel()
    assert not pruned[~below].any(), "a sample at or above the mean was pruned"
    assert int(pruned.sum()) == math.floor(0.4 * int(below.sum()))
    assert torch.equal(s.subset, s.subset.sort().values) and s.subset.dtype == torch.int64
    # different seeds prune different (random) samples
    other = InfoBatchSampler(n, epochs=10, ratio=0.4, seed=4)
    other.set_epoch(0)
    other.record(torch.arange(n), scores)
    other.end_epoch()
    assert other.subset.numel() == s.subset.numel() and not torch.equal(other.subset, s.subset)


def test_candidates_are_strictly_below_mean():
    t = InfoBatchSampler(30, epochs=10, ratio=0.9, seed=0)
    t.set_epoch(0)
    t.record(torch.arange(30), torch.tensor([1.0] * 10 + [3.0] * 10 + [2.0] * 10))  # mean exactly 2.0
    assert t.end_epoch().event == "prune"
    kept = set(t.subset.tolist())
    assert set(range(10, 30)) <= kept and len(kept & set(range(10))) == 1  # 9 = floor(0.9 * 10) of the 1.0s pruned


def test_floor_of_ratio_times_candidates_can_be_zero():
    t = InfoBatchSampler(4, epochs=10, ratio=0.5)
    t.set_epoch(0)
    t.record(torch.arange(4), torch.tensor([1.0, 2.0, 2.0, 3.0]))
    assert t.end_epoch().event == "keep"  # one candidate, floor(0.5 * 1) = 0 pruned
    t.set_epoch(1)
    assert t.subset.tolist() == [0, 1, 2, 3] and t.loss_weights(torch.arange(4)) is None


def test_rescale_applies_to_exactly_kept_below_mean():
    n = 200
    s = InfoBatchSampler(n, epochs=8, ratio=0.5, seed=1)
    s.set_epoch(0)
    assert s.loss_weights(torch.arange(n)) is None  # epoch 0: all data, all weights 1
    losses = _loss(torch.arange(n), 0)
    s.record(torch.arange(n), losses)
    s.end_epoch()
    s.set_epoch(1)
    below = losses < losses.mean()
    in_subset = torch.zeros(n, dtype=torch.bool)
    in_subset[s.subset] = True
    w = s.loss_weights(torch.arange(n))
    assert w is not None and w.dtype == torch.float32
    kept_below = below & in_subset
    assert torch.allclose(w[kept_below], torch.tensor(2.0)) and torch.equal(w[~below], torch.ones(int((~below).sum())))
    batch = torch.tensor(list(s))[:16]
    assert torch.equal(s.loss_weights(batch), torch.where(below[batch], 2.0, 1.0).float())
    # nothing below the mean: no pruning and no weights
    flat = InfoBatchSampler(n, epochs=8, ratio=0.5)
    flat.set_epoch(0)
    flat.record(torch.arange(n), torch.ones(n))
    assert flat.end_epoch().event == "keep"
    flat.set_epoch(1)
    assert flat.loss_weights(torch.arange(n)) is None and flat.subset.numel() == n
    # ratio 0: InfoBatch off, never weights
    off = InfoBatchSampler(n, epochs=4, ratio=0.0)
    assert all(sub.numel() == n and bool((wt == 1).all()) for sub, wt, _ in _run(off, 4))
    off.set_epoch(2)
    assert off.loss_weights(torch.arange(n)) is None


def test_annealing_trains_all_data_with_weight_one():
    n, epochs, delta = 300, 16, 0.75
    s = InfoBatchSampler(n, epochs=epochs, ratio=0.5, delta=delta, seed=2)
    out = _run(s, epochs)
    anneal_start = round(delta * epochs)  # 12: epochs 12..15 train on all data
    for e, (subset, weights, event) in enumerate(out, start=1):  # out[i] is for epoch i + 1
        if e >= anneal_start:
            assert event == "anneal" and subset.numel() == n and bool((weights == 1).all()), e
        else:
            assert event == "prune" and subset.numel() < n and bool((weights > 1).any()), e
    s.set_epoch(anneal_start)
    assert s.loss_weights(torch.arange(n)) is None
    assert s.ratio_history == [0.5] * (anneal_start - 1) + [0.0] * (epochs - anneal_start + 1)


def test_scores_keep_old_value_when_not_trained():
    n = 100
    s = InfoBatchSampler(n, epochs=10, ratio=0.5, seed=0)
    _epoch(s, 0)
    pruned = sorted(set(range(n)) - set(s.subset.tolist()))
    before = s.scores.clone()
    _epoch(s, 1, loss=lambda i, e: torch.full((i.numel(),), 5.0, dtype=torch.float64))
    assert torch.equal(s.scores[pruned], before[pruned])
    trained = torch.ones(n, dtype=torch.bool)
    trained[pruned] = False
    assert bool((s.scores[trained] == 5.0).all())


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("target", [None, 0.7])
def test_resume_continues_exactly(target):
    n, epochs = 157, 12
    kwargs = dict(epochs=epochs, ratio=0.5, delta=0.75, target_compute=target, seed=11)
    full = InfoBatchSampler(n, **kwargs)
    reference = _run(full, epochs)
    for stop in (1, 4, 8, 10):
        a = InfoBatchSampler(n, **kwargs)
        _run(a, stop)
        b = InfoBatchSampler(n, **kwargs)
        b.load_state_dict(_roundtrip(a.state_dict()))
        b.set_epoch(stop)
        a.set_epoch(stop)
        assert list(b) == list(a)
        wa, wb = a.loss_weights(torch.arange(n)), b.loss_weights(torch.arange(n))
        assert (wa is None and wb is None) or torch.equal(wa, wb)
        rest = _run(b, epochs, start=stop)
        for (s1, w1, e1), (s2, w2, e2) in zip(rest, reference[stop:], strict=True):
            assert torch.equal(s1, s2) and torch.equal(w1, w2) and e1 == e2
        assert b.ratio_history == full.ratio_history
        assert b.samples_trained == full.samples_trained


def test_resume_refuses_other_parameters():
    a = InfoBatchSampler(20, epochs=4, ratio=0.5)
    state = a.state_dict()
    for kwargs in (dict(ratio=0.6), dict(delta=0.5), dict(target_compute=0.5), dict(epochs=5)):
        with pytest.raises(ValueError, match="InfoBatch parameters"):
            InfoBatchSampler(20, **{"epochs": 4, **kwargs}).load_state_dict(state)
    with pytest.raises(ValueError, match="samples"):
        InfoBatchSampler(21, epochs=4).load_state_dict(state)
    with pytest.raises(ValueError, match="InfoBatch state"):
        InfoBatchSampler(20, epochs=4).load_state_dict(DaPSampler(20, config=None, select="none").state_dict())


@pytest.mark.parametrize("target", [0.63, 0.8])
def test_target_compute_lands_within_one_percent(target):
    n, epochs = 1000, 40
    s = InfoBatchSampler(n, epochs=epochs, target_compute=target, seed=5)
    sizes = []
    for e in range(epochs):
        sizes.append(s.subset.numel())
        _epoch(s, e)
    below = float((_loss(torch.arange(n), 0) < _loss(torch.arange(n), 0).mean()).float().mean())
    assert 0.65 < below < 0.75  # the premise: about 70% below the mean
    budget = target * epochs * n
    assert abs(sum(sizes) - budget) <= 0.01 * budget, (sum(sizes), budget)
    assert s.samples_trained == sum(sizes)
    assert len(s.ratio_history) == epochs and all(0.0 <= r <= MAX_RATIO for r in s.ratio_history)
    assert all(abs(r - 0.5) > 0.01 for r in s.ratio_history[1:34])  # calibrated, not the default constant
    # the constant-ratio default trains a different amount: the target is what moved it
    c = InfoBatchSampler(n, epochs=epochs, ratio=0.5, seed=5)
    const = 0
    for e in range(epochs):
        const += c.subset.numel()
        _epoch(c, e)
    assert abs(const - budget) > 0.01 * budget


def test_two_ranks_disjoint_shards_and_identical_subsets():
    n = 101
    ranks = [InfoBatchSampler(n, epochs=6, ratio=0.5, num_replicas=2, rank=r, seed=9) for r in range(2)]
    for e in range(3):
        for s in ranks:
            s.set_epoch(e)
        shards = [list(s) for s in ranks]
        assert torch.equal(ranks[0].subset, ranks[1].subset)
        assert len(shards[0]) == len(shards[1]) == len(ranks[0])
        size = ranks[0].subset.numel()
        assert set(shards[0]) | set(shards[1]) == set(ranks[0].subset.tolist())
        if size % 2 == 0:
            assert not set(shards[0]) & set(shards[1])
        else:  # one pad sample repeated from the front of the order, as DistributedSampler does
            assert len(set(shards[0]) & set(shards[1])) == 1
        # each rank records only its shard; end_epoch merges nothing without a process group, so feed both shards
        for s in ranks:
            idx = torch.tensor(shards[0] + shards[1])
            s.record(idx, _loss(idx, e))
            s.end_epoch()
    assert torch.equal(ranks[0].weights, ranks[1].weights) and ranks[0].subset.numel() < n


def test_iter_is_idempotent():
    s = InfoBatchSampler(64, epochs=6, ratio=0.5, num_replicas=3, rank=2, seed=4)
    _run(s, 2)
    s.set_epoch(2)
    first = list(s)
    assert first == list(s) and len(first) == len(s) == math.ceil(s.subset.numel() / 3)
    s.set_epoch(3)
    assert list(s) != first


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epochs=0), "epochs"),
        (dict(epochs=4, ratio=1.0), "ratio"),
        (dict(epochs=4, ratio=-0.1), "ratio"),
        (dict(epochs=4, delta=0.0), "delta"),
        (dict(epochs=4, delta=1.5), "delta"),
        (dict(epochs=4, target_compute=0.0), "target_compute"),
        (dict(epochs=4, target_compute=1.2), "target_compute"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfoBatchSampler(10, **kwargs)


def test_loss_weights_follow_indices_device_and_dtype():
    s = InfoBatchSampler(50, epochs=6, ratio=0.5)
    for e in range(4):  # the cached copy must be refreshed every epoch, not kept from the first call
        s.set_epoch(e)
        w = s.loss_weights(torch.arange(50))
        assert (w is None) == (e == 0) and (w is None or torch.equal(w, s.weights)), e
        _epoch(s, e)
    s.set_epoch(4)
    w = s.loss_weights(torch.tensor([0, 1, 2], dtype=torch.int32))
    assert w.dtype == torch.float32 and w.device.type == "cpu" and w.shape == (3,)
    if torch.cuda.is_available():
        wc = s.loss_weights(torch.tensor([0, 1, 2], device="cuda"))
        assert wc.device.type == "cuda" and torch.equal(wc.cpu(), w)
