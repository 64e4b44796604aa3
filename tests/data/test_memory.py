"""The in-memory data path: on-device crop + flip statistics, index alignment, determinism, and parity with JPEG."""

from __future__ import annotations

import math

import pytest
import torch

from dap_pretrain.data.dataset import IndexedDataset, create_dataset
from dap_pretrain.data.loader import cifar_transform, create_loader
from dap_pretrain.data.memory import (
    PAD,
    InMemoryLoader,
    crop_flip_params,
    decode_dataset,
    gather_crop_flip,
)
from dap_pretrain.data.sampler import DaPSampler
from dap_pretrain.schedule import DaPConfig

MEAN, STD = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)  # identity normalisation: batches keep pixel values


def _index_images(n: int, size: int = 32) -> torch.Tensor:
    """Images that encode their own index: channel 0 = index % 251, channel 1 = index // 251, channel 2 = column + 1."""
    img = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    idx = torch.arange(n)
    img[:, 0] = (idx % 251 + 1).view(n, 1, 1).to(torch.uint8)
    img[:, 1] = (idx // 251 + 1).view(n, 1, 1).to(torch.uint8)
    img[:, 2] = (torch.arange(size) + 1).to(torch.uint8).view(1, 1, size)
    return img


def test_offsets_uniform_over_0_to_8_and_flips_at_half():
    g = torch.Generator().manual_seed(0)
    ox, oy, flip = crop_flip_params(90_000, generator=g, device=torch.device("cpu"))
    for offsets in (ox, oy):
        counts = torch.bincount(offsets, minlength=2 * PAD + 1).double()
        assert counts.numel() == 9 and offsets.min() == 0 and offsets.max() == 8
        expected = offsets.numel() / 9
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 26.1  # chi-square, 8 degrees of freedom, p = 0.001
    assert abs(flip.double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / flip.numel())
    assert not torch.equal(ox, oy)  # independent axes


def test_crop_and_flip_match_a_reference_per_sample():
    torch.manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    padded = torch.nn.functional.pad(images, (PAD,) * 4)
    ox, oy = torch.tensor([0, 8, 3, 4, 8, 0]), torch.tensor([0, 8, 5, 4, 0, 8])
    flip = torch.tensor([False, True, False, True, True, False])
    index = torch.tensor([5, 0, 2, 2, 1, 3])
    out = gather_crop_flip(padded.permute(0, 2, 3, 1).contiguous(), index, ox, oy, flip, 32)
    assert out.shape == (6, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)
    for b in range(6):
        ref = padded[index[b], :, oy[b] : oy[b] + 32, ox[b] : ox[b] + 32]
        ref = ref.flip(-1) if flip[b] else ref
        assert torch.equal(out[b], ref), b


def _sampler(n: int, **kw) -> DaPSampler:
    cfg = DaPConfig(epochs=6, warmup=1, interval=1, keep=0.5, reuse=(4,))
    return DaPSampler(n, config=cfg, seed=3, **kw)


def test_batches_carry_their_own_index_after_crop_and_flip():
    n = 700
    images = _index_images(n)
    sampler = _sampler(n)
    loader = InMemoryLoader(
        images, torch.arange(n) % 10, sampler=sampler, batch_size=64, mean=MEAN, std=STD, device="cpu", train=True
    )
    sampler.set_epoch(2)
    seen = []
    for x, y, index in loader:
        centre = x[:, :, PAD:-PAD, PAD:-PAD]  # always inside the original image whatever the offset
        decoded = (centre[:, 0] - 1) + 251 * (centre[:, 1] - 1)
        assert torch.equal(decoded, index.view(-1, 1, 1).expand_as(decoded).to(decoded.dtype))
        assert torch.equal(y, index % 10)
        # channel 2 holds column + 1: a flipped crop runs right to left, an unflipped one left to right
        row = x[:, 2, 16, PAD:-PAD]
        steps = row[:, 1:] - row[:, :-1]
        assert bool(((steps == 1).all(1) | (steps == -1).all(1)).all())
        seen.append(index)
    assert torch.equal(torch.cat(seen), sampler.indices())
    assert len(loader) == math.ceil(n / 64)


def test_same_seed_same_batch_and_epochs_differ():
    n = 300
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)

    def first_batch(epoch: int, seed: int = 3):
        sampler = DaPSampler(n, seed=seed)
        sampler.set_epoch(epoch)
        loader = InMemoryLoader(
            images,
            torch.zeros(n, dtype=torch.int64),
            sampler=sampler,
            batch_size=50,
            mean=MEAN,
            std=STD,
            device="cpu",
            train=True,
            seed=seed,
        )
        return next(iter(loader))

    a, b, c = first_batch(1), first_batch(1), first_batch(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(first_batch(1, seed=4)[0], a[0])


def test_drop_last_and_eval_order():
    images = _index_images(130)
    loader = InMemoryLoader(
        images,
        torch.arange(130),
        sampler=list(range(1, 130, 2)),
        batch_size=20,
        mean=MEAN,
        std=STD,
        device="cpu",
        train=False,
        drop_last=True,
    )
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(1, 121, 2))
    assert torch.equal(batches[0][0], images[1:41:2].float())  # no augmentation at evaluation


def test_decode_dataset_matches_the_jpeg_pipeline(cifar_tiny):
    ds = IndexedDataset(create_dataset(name="", root=cifar_tiny, split="val", is_training=False))
    images, targets = decode_dataset(ds, img_size=32, batch_size=37)
    assert images.shape == (len(ds), 3, 32, 32) and images.dtype == torch.uint8
    ds.transform = cifar_transform(img_size=32, is_training=False)
    for i in (0, 17, len(ds) - 1):
        img, target, index = ds[i]
        assert torch.equal(images[i], img) and int(targets[i]) == target and index == i


def test_in_memory_and_jpeg_paths_give_the_same_subsets(cifar_tiny):
    """Same sampler, same per-sample losses: both paths batch the same indices and pick the same subsets."""
    ds = IndexedDataset(create_dataset(name="", root=cifar_tiny, split="train", is_training=True))
    images, targets = decode_dataset(ds, img_size=32)
    ds.transform = cifar_transform(img_size=32, is_training=True)
    loss_of = torch.rand(len(ds), generator=torch.Generator().manual_seed(5))
    runs = {}
    for path in ("memory", "jpeg"):
        sampler = _sampler(len(ds))
        if path == "memory":
            loader = InMemoryLoader(
                images, targets, sampler=sampler, batch_size=48, mean=MEAN, std=STD, device="cpu", train=True
            )
        else:
            loader = create_loader(ds, batch_size=48, sampler=sampler, mean=MEAN, std=STD, device="cpu", num_workers=0)
        subsets, orders = [], []
        for epoch in range(6):
            sampler.set_epoch(epoch)
            order = []
            for _, y, index in loader:
                assert torch.equal(y.cpu(), targets[index.cpu()])
                sampler.record(index, loss_of[index.cpu()] + 0.01 * epoch)
                order.append(index.cpu())
            sampler.end_epoch()
            subsets.append(sampler.subset.clone())
            orders.append(torch.cat(order))
        runs[path] = (subsets, orders)
    for a, b in zip(*(runs[p][0] for p in runs), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(*(runs[p][1] for p in runs), strict=True):
        assert torch.equal(a, b)
    sizes = [s.numel() for s in runs["memory"][0]]
    assert sizes == [400, 200, 100, 400, 200, 100]  # the schedule actually dropped and picked data back up


@pytest.mark.gpu
def test_on_cuda_batches_stay_on_device():
    images = _index_images(256)
    sampler = _sampler(256)
    loader = InMemoryLoader(
        images, torch.arange(256), sampler=sampler, batch_size=64, mean=MEAN, std=STD, device="cuda", train=True
    )
    x, y, index = next(iter(loader))
    assert x.is_cuda and y.is_cuda and index.is_cuda
