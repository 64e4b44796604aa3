"""DDP: two gloo ranks record their shards, merge once per epoch, and agree on every subset."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dap_pretrain.data.sampler import DaPSampler
from dap_pretrain.schedule import DaPConfig

N, EPOCHS = 103, 8
CFG = DaPConfig(epochs=EPOCHS, warmup=1, interval=2, keep=0.75, active=5, reuse=(6,))


def _loss(index, epoch):
    return torch.cos(index.double() * 3.7 + epoch).abs() + index.double() * 1e-9


def _train(sampler, rank_log=None):
    subsets = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        shard = torch.tensor(list(sampler))
        if rank_log is not None:
            rank_log.append(shard)
        for chunk in shard.split(5):
            sampler.record(chunk, _loss(chunk, epoch))
        sampler.end_epoch()
        subsets.append(sampler.subset.clone())
    return subsets


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shards = []
        sampler = DaPSampler(N, config=CFG, seed=7)  # replicas/rank from the process group
        subsets = _train(sampler, shards)
        torch.save({"subsets": subsets, "shards": shards}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree_with_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = _train(DaPSampler(N, config=CFG, seed=7))
    for e in range(EPOCHS):
        assert torch.equal(r0["subsets"][e], r1["subsets"][e])
        assert torch.equal(r0["subsets"][e], single[e])
    # each epoch the two shards together cover exactly the subset that epoch trained on
    trained_on = [torch.arange(N)] + single[:-1]
    for e in range(EPOCHS):
        union = torch.cat([r0["shards"][e], r1["shards"][e]]).unique()
        assert torch.equal(union, trained_on[e])
    assert len({s.numel() for s in single}) > 2  # drops and a reuse actually happened
