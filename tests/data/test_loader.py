"""Index alignment: every recorded loss lands on the sample that produced it.

The images encode their own dataset index in their pixels; the "model" decodes it from the
batch tensor, so a loss recorded against the wrong index is caught, through worker processes,
shuffling, subsets and the prefetching loader.
"""

import torch
from torch.utils.data import DataLoader, Dataset

from dap_pretrain.data.dataset import IndexedDataset
from dap_pretrain.data.loader import create_loader, indexed_uint8_collate
from dap_pretrain.data.sampler import DaPSampler
from dap_pretrain.schedule import DaPConfig


class SelfIndexingImages(Dataset):
    """uint8 3x4x4 images: channel 0 holds index // 256, channel 1 index % 256."""

    def __init__(self, n):
        self.n = n
        self.transform = None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = torch.zeros(3, 4, 4, dtype=torch.uint8)
        img[0], img[1] = i // 256, i % 256
        return img, i % 10


def _decode(images: torch.Tensor) -> torch.Tensor:
    return (images[:, 0, 0, 0].round() * 256 + images[:, 1, 0, 0].round()).long()


def _check_epochs(loader, sampler, epochs=4):
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        n = 0
        for images, targets, indices in loader:
            decoded = _decode(images.float())
            assert torch.equal(decoded, indices.to(decoded.device))
            assert torch.equal(targets.cpu(), decoded.cpu() % 10)
            sampler.record(indices, decoded.double())  # loss = the decoded index
            n += indices.numel()
        mean = sampler.recorder.mean_losses()
        seen = sampler.recorder.seen()
        assert seen.sum() == n == sampler.subset.numel()
        assert torch.equal(mean[seen], torch.arange(len(mean), dtype=torch.float64)[seen])
        sampler.end_epoch()


def test_dataloader_with_workers_records_right_index():
    ds = IndexedDataset(SelfIndexingImages(600))
    sampler = DaPSampler(600, config=DaPConfig(epochs=4, warmup=1, interval=1, keep=0.7), seed=2)
    loader = DataLoader(ds, batch_size=32, sampler=sampler, num_workers=2, collate_fn=indexed_uint8_collate)
    _check_epochs(loader, sampler)
    assert sampler.subset.numel() == 205  # 600 -> 420 -> 294 -> 205: kept the hardest, i.e. the largest indices
    assert sampler.subset.min() == 600 - 205


def test_prefetch_loader_records_right_index():
    ds = IndexedDataset(SelfIndexingImages(600))
    sampler = DaPSampler(600, config=DaPConfig(epochs=4, warmup=1, interval=1, keep=0.7), seed=2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # mean 0, std 1/255 makes the prefetcher's normalisation the identity on pixel values
    loader = create_loader(
        ds,
        batch_size=32,
        sampler=sampler,
        mean=(0, 0, 0),
        std=(1 / 255,) * 3,
        device=device,
        num_workers=2,
        channels_last=True,
    )
    _check_epochs(loader, sampler)
    assert sampler.subset.min() == 600 - 205


def test_chunked_workers_cut_the_same_batches_as_one_dataloader():
    """Workers load chunks; the prefetcher joins them into exactly the batches a plain DataLoader would cut."""
    from dap_pretrain.data.loader import chunk_size

    assert chunk_size(256, 14) == 16 and chunk_size(128, 2) == 64 and chunk_size(100, 14) == 5
    assert chunk_size(127, 14) == 127 and chunk_size(64, 0) == 64  # prime: no useful divisor; no workers
    assert chunk_size(8, 14) == 4 and chunk_size(6, 4) == 6 and chunk_size(2, 2) == 2  # never chunks under 4
    ds = IndexedDataset(SelfIndexingImages(203))
    for drop_last in (False, True):
        sampler = DaPSampler(203, config=DaPConfig(epochs=2, warmup=1, interval=1, keep=0.7), seed=5)
        sampler.set_epoch(0)
        plain = DataLoader(ds, batch_size=24, sampler=sampler, collate_fn=indexed_uint8_collate, drop_last=drop_last)
        chunked = create_loader(ds, batch_size=24, sampler=sampler, mean=(0, 0, 0), std=(1 / 255,) * 3,
                                device="cpu", num_workers=3, drop_last=drop_last, seed=0)  # fmt: skip
        assert chunked.loader.batch_size == 8
        want = [idx.tolist() for _, _, idx in plain]
        got = [idx.tolist() for _, _, idx in chunked]
        assert got == want and len(chunked) == len(want)
