"""In-memory data path: a small dataset decoded once into a uint8 tensor on the training device.

Who calls what, and when:

1. :func:`decode_dataset` once per split at start-up: every image of an :class:`IndexedDataset` is decoded
   (resized to ``img_size`` and centre-cropped, a no-op on CIFAR's 32x32), stacked into one ``(N, 3, H, W)``
   uint8 tensor, with the labels beside it.
2. :class:`InMemoryLoader` wraps that tensor and a sampler. Each ``iter()`` reads the sampler's index order for
   the epoch (``sampler.indices()``: this rank's shard of the current subset, or any sequence of indices),
   gathers each batch by index on the device and augments it there with the paper's CIFAR augmentation
   (4-pixel zero-padded random crop + horizontal flip, per sample), then normalises. Batches are
   ``(input, target, index)`` exactly as from :func:`~dap_pretrain.data.loader.create_loader`, so the DaP
   sampler, schedule and loss recorder drive both paths the same way; here ``index`` lives on the device.

Randomness comes from a local ``torch.Generator`` on the device seeded with ``(seed, epoch, rank)`` at the start
of each epoch, so an epoch's augmentation is a function of those three numbers alone: a resumed run repeats it
without any RNG state in the checkpoint, and no global RNG is touched. No worker processes, no host sync per
step (the only host-to-device copy is the epoch's index order, once).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dap_pretrain.data.dataset import DataError
from dap_pretrain.data.loader import (
    Normalize,
    cifar_transform,
    epoch_seed,
    indexed_uint8_collate,
    private_generator,
)

_logger = logging.getLogger(__name__)

PAD = 4  # pixels of zero padding around each image before the random crop (the paper's CIFAR augmentation)


def decoded_bytes(num_samples: int, img_size: int) -> int:
    """Bytes the decoded uint8 tensor of ``num_samples`` RGB images of ``img_size`` px will take."""
    return num_samples * 3 * img_size * img_size


_DECODED: dict = {}  # (file list digest, img_size) -> (images, targets): runs sharing a process decode once
_DECODED_LOCK = threading.Lock()


def _decoded_key(dataset, img_size: int) -> tuple | None:
    """Identifies a folder dataset by its file list and labels; None where there is no cheap list (no sharing)."""
    samples = getattr(dataset, "samples", None)
    if not samples:
        return None
    digest = hashlib.sha1()
    for path, target in samples:
        digest.update(f"{path}\t{target}\n".encode())
    return digest.hexdigest(), img_size


def decode_dataset(
    dataset, *, img_size: int, num_workers: int = 0, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of ``dataset`` once; returns ``(images (N, 3, S, S) uint8, targets (N,) int64)`` on CPU.

    ``dataset`` is an :class:`~dap_pretrain.data.dataset.IndexedDataset`; its transform is replaced for the
    duration by the evaluation-time CIFAR transform (resize short side + centre crop to ``img_size``, no
    augmentation) and restored afterwards. Decoding runs in ``num_workers`` loader processes. Within one process
    a folder dataset is decoded once and the (read-only) result shared: ``dap_pretrain.multirun`` trains several
    runs on the same data in threads.

    Raises:
        DataError: an image could not be stacked (e.g. a transform produced another size).
    """
    key = _decoded_key(dataset, img_size)
    if key is None:
        return _decode(dataset, img_size=img_size, num_workers=num_workers, batch_size=batch_size)
    with _DECODED_LOCK:  # held while decoding: the other runs wait for the one decode instead of repeating it
        if key not in _DECODED:
            _DECODED[key] = _decode(dataset, img_size=img_size, num_workers=num_workers, batch_size=batch_size)
        return _DECODED[key]


def _decode(dataset, *, img_size: int, num_workers: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(dataset)
    images = torch.empty((n, 3, img_size, img_size), dtype=torch.uint8)
    targets = torch.empty(n, dtype=torch.int64)
    saved = dataset.transform
    dataset.transform = cifar_transform(img_size=img_size, is_training=False)
    try:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=indexed_uint8_collate,
            generator=private_generator(),
        )
        filled = torch.zeros(n, dtype=torch.bool)
        for batch, y, idx in loader:
            if not idx.numel():
                continue
            if batch.shape[1:] != images.shape[1:]:
                raise DataError(
                    f"image {int(idx[0])} decoded to shape {tuple(batch.shape[1:])}, expected "
                    f"{tuple(images.shape[1:])}; pass --in-memory off for this dataset"
                )
            images[idx] = batch
            targets[idx] = y
            filled[idx] = True
        if not bool(filled.all()):
            missing = int((~filled).nonzero()[0])
            raise DataError(
                f"image {dataset.name(missing)} cannot be decoded ({int((~filled).sum())} unreadable in all); "
                "remove or replace it, or pass --in-memory off to skip unreadable files each epoch"
            )
    finally:
        dataset.transform = saved
    return images, targets


def crop_flip_params(
    batch: int, *, pad: int = PAD, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample augmentation parameters: x and y crop offsets uniform on ``0..2*pad``, flips with probability 1/2."""
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator, device=device)
    flip = torch.randint(0, 2, (batch,), generator=generator, device=device).bool()
    return offsets[0], offsets[1], flip


def gather_crop_flip(
    padded_nhwc: torch.Tensor, index: torch.Tensor, ox: torch.Tensor, oy: torch.Tensor, flip: torch.Tensor, size: int
) -> torch.Tensor:
    """Gather ``padded_nhwc[index]`` cropped at ``(oy, ox)`` to ``size`` px and flipped where ``flip``, in one gather.

    ``padded_nhwc`` is ``(N, H + 2 pad, W + 2 pad, C)`` uint8. Returns ``(B, C, size, size)`` uint8 whose memory is
    channels-last (a permuted view of the gathered NHWC block). A flip reverses the crop's columns, which is
    what cropping and then flipping the crop does.
    """
    steps = torch.arange(size, device=padded_nhwc.device)
    rows = oy[:, None] + steps  # (B, size)
    cols = torch.where(flip[:, None], ox[:, None] + (size - 1 - steps), ox[:, None] + steps)
    out = padded_nhwc[index[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, size, size, C)
    return out.permute(0, 3, 1, 2)


class InMemoryLoader:
    """Batches ``(input, target, index)`` gathered from a device-resident uint8 dataset, augmented on the device.

    Args:
        images: ``(N, 3, S, S)`` uint8 (from :func:`decode_dataset`); copied to ``device`` once.
        targets: ``(N,)`` int64 labels.
        sampler: gives the epoch's order: an object with ``indices()`` (e.g.
            :class:`~dap_pretrain.data.sampler.DaPSampler`: this rank's shard, re-read at every ``iter()``) or a
            fixed sequence of indices (evaluation shards).
        batch_size: images per batch (per process).
        mean, std: normalisation in 0..1 units, as the model's pretrained config gives them.
        device: where the data lives and batches are made.
        train: augment (crop + flip) when True; plain images when False.
        seed, rank: with the sampler's epoch, seed each epoch's augmentation generator.
        drop_last: drop the last partial batch.
        channels_last: keep the batches channels-last (they are gathered that way; otherwise made contiguous).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        sampler,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != targets.shape[0]:
            raise ValueError("images must be (N, C, H, W) uint8 with one target per image")
        self.device = torch.device(device)
        self.size = images.shape[-1]
        pad = PAD if train else 0
        # NHWC storage: a batch gathered by (index, row, col) comes out channels-last and contiguous.
        self.store = F.pad(images, (pad, pad, pad, pad)).permute(0, 2, 3, 1).contiguous().to(self.device)
        self.targets = targets.to(self.device)
        self.sampler = sampler
        self.batch_size = batch_size
        self.train = train
        self.seed, self.rank = int(seed), int(rank)
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.normalize = Normalize(mean, std, device=self.device)
        self.generator = torch.Generator(device=self.device)

    def describe(self) -> str:
        """One line for the run log: what is held where."""
        return f"in-memory data: {self.store.shape[0]} images, {self.store.numel() / 2**20:.1f} MiB on {self.device}"

    def _order(self) -> torch.Tensor:
        order = self.sampler.indices() if hasattr(self.sampler, "indices") else self.sampler
        return torch.as_tensor(order if isinstance(order, torch.Tensor) else list(order), dtype=torch.int64)

    def epoch_seed(self) -> int:
        """The augmentation seed of the sampler's current epoch on this rank (0 when the sampler has no epoch)."""
        return epoch_seed(self.seed, int(getattr(self.sampler, "epoch", 0)), self.rank)

    def __len__(self) -> int:
        n = len(self.sampler)  # the sampler's own count: no epoch permutation built just to be measured
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.device, non_blocking=True)
        self.generator.manual_seed(self.epoch_seed())
        n = order.numel()
        end = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for start in range(0, end, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self._batch(index), self.targets[index], index

    def _batch(self, index: torch.Tensor) -> torch.Tensor:
        if self.train:
            ox, oy, flip = crop_flip_params(index.numel(), generator=self.generator, device=self.device)
            images = gather_crop_flip(self.store, index, ox, oy, flip, self.size)
        else:
            images = self.store[index].permute(0, 3, 1, 2)
        return self.normalize(images, channels_last=self.channels_last)


def in_memory_loaders(
    train,
    val,
    *,
    img_size: int,
    sampler,
    val_indices: Sequence[int] | None,
    batch_size: int,
    val_batch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    seed: int,
    rank: int,
    workers: int,
    drop_last: bool,
    channels_last: bool,
) -> tuple[InMemoryLoader, InMemoryLoader | None]:
    """Decode the train (and val) split once and wrap them; the trainer's entry to this module."""
    images, targets = decode_dataset(train, img_size=img_size, num_workers=workers)
    train_loader = InMemoryLoader(
        images,
        targets,
        sampler=sampler,
        batch_size=batch_size,
        mean=mean,
        std=std,
        device=device,
        train=True,
        seed=seed,
        rank=rank,
        drop_last=drop_last,
        channels_last=channels_last,
    )
    val_loader = None
    if val is not None:
        v_images, v_targets = decode_dataset(val, img_size=img_size, num_workers=workers)
        val_loader = InMemoryLoader(
            v_images,
            v_targets,
            sampler=list(val_indices),
            batch_size=val_batch_size,
            mean=mean,
            std=std,
            device=device,
            train=False,
            channels_last=channels_last,
        )
    return train_loader, val_loader
