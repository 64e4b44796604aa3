"""``--grad-accum-steps`` under DDP (two gloo processes on the CPU): the ranks' weights stay identical, also when
the epoch's last batch is a single sample that BatchNorm cannot train on and is skipped mid-group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from engine_stubs import FixedLR, RecordingSampler
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dap_pretrain.engine import train_one_epoch


def _counting_allreduce(calls: list, bucket):
    """A DDP communication hook: DDP's own averaging all-reduce, counted."""
    calls.append(1)
    return default_hooks.allreduce_hook(None, bucket)


def _rank(rank: int, world: int, port: int, sizes: list[int], accum: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial weights on both ranks
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=1000)  # one bucket: one all-reduce
    calls: list = []
    model.register_comm_hook(calls, _counting_allreduce)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as its shard
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    x, y = torch.randn(sum(sizes), 6, generator=gen), torch.randint(0, 3, (sum(sizes),), generator=gen)
    loader = [(x[s : s + n], y[s : s + n], torch.arange(s, s + n)) for s, n in zip(starts, sizes, strict=True)]
    train_one_epoch(model, loader, opt, epoch=0, sampler=RecordingSampler(), lr_scheduler=FixedLR(),
                    device=torch.device("cpu"), grad_accum_steps=accum, show_progress=False)  # fmt: skip
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save({**state, "allreduces": len(calls)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _weights_after(tmp_path, port: int, sizes: list[int], accum: int) -> list[dict]:
    mp.spawn(_rank, args=(2, port, sizes, accum, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _weights_agree(a: dict, b: dict) -> bool:
    """The parameters (BatchNorm's running statistics are each rank's own)."""
    return all(torch.equal(a[k], b[k]) for k in a if k != "allreduces" and "running" not in k and "batches" not in k)


def test_gradients_are_all_reduced_once_per_update(tmp_path, free_port):
    """Six micro-batches, groups of 3: two all-reduces per rank, as timm's no_sync (forward and backward inside
    it), not six; and the ranks end with the same weights."""
    a, b = _weights_after(tmp_path, free_port(), [4] * 6, accum=3)
    assert a["allreduces"] == b["allreduces"] == 2, (a["allreduces"], b["allreduces"])
    assert _weights_agree(a, b)


def test_ranks_agree_when_the_last_batch_of_one_is_skipped_mid_group(tmp_path, free_port):
    """Steps 2 and 3 form the last group; step 3 holds one sample and is skipped. Step 2's gradient was kept
    rank-local (``no_sync``), so the update after the skip must all-reduce it, as DDP would have."""
    a, b = _weights_after(tmp_path, free_port(), [4, 4, 4, 1], accum=2)
    assert _weights_agree(a, b), [k for k in a if k != "allreduces" and not torch.equal(a[k], b[k])]
