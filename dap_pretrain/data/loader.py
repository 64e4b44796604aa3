"""Training/eval loaders whose batches carry dataset indices: ``(input, target, index)``.

timm's ``PrefetchLoader`` yields only ``(input, target)``; a loss recorded behind it cannot be
tied to a sample. :class:`IndexedPrefetchLoader` does the same job (uint8 batches from the
workers, transfer on a side stream, normalisation on the device) and keeps the index in the batch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms as T

_logger = logging.getLogger(__name__)


def indexed_uint8_collate(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate ``(uint8 CHW image, target, index)`` samples into three tensors (no float copy).

    Samples whose image is None (unreadable files, see :class:`~dap_pretrain.data.dataset.IndexedDataset`) are
    left out, so their index never reaches the loss recorder; a batch of only such samples is empty.
    """
    batch = [b for b in batch if b[0] is not None]
    if not batch:
        return (
            torch.empty((0, 3, 1, 1), dtype=torch.uint8),
            torch.empty(0, dtype=torch.int64),
            torch.empty(0, dtype=torch.int64),
        )
    images = torch.stack([torch.from_numpy(b[0]) if isinstance(b[0], np.ndarray) else b[0] for b in batch])
    targets = torch.as_tensor([b[1] for b in batch], dtype=torch.int64)
    indices = torch.as_tensor([b[2] for b in batch], dtype=torch.int64)
    return images, targets, indices


def exact_batches(chunks: Iterable[tuple], batch_size: int, *, drop_last: bool) -> Iterator[list[tuple]]:
    """Consecutive chunks, grouped (and split where needed) into lists of exactly ``batch_size`` samples.

    Each chunk is a tuple of per-sample fields of one length (tensors or lists, sliced along their first
    dimension); an empty chunk (only unreadable files) adds nothing. The groups cut the samples' order every
    ``batch_size`` samples, as one DataLoader of ``batch_size`` would; the last, shorter group is dropped with
    ``drop_last``.
    """
    group, n = [], 0
    for chunk in chunks:
        while len(chunk[0]):
            take = min(batch_size - n, len(chunk[0]))
            group.append(tuple(field[:take] for field in chunk))
            chunk = tuple(field[take:] for field in chunk)
            n += take
            if n == batch_size:
                yield group
                group, n = [], 0
    if group and not drop_last:
        yield group


class Normalize:
    """``(x / 255 - mean) / std`` for a batch of 0..255 values (uint8 or float), as one multiply-add written straight
    into the output layout: no separate float copy, no second pass for the division, no channels-last copy.

    Every train loader calls it (:class:`IndexedPrefetchLoader`, the in-memory loader, the GPU JPEG pipeline).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, device, dtype: torch.dtype = torch.float32):
        shape = (1, len(mean), 1, 1)
        self.scale = torch.tensor([1 / (255 * s) for s in std], device=device, dtype=dtype).view(shape)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=device, dtype=dtype)
        self.shift = self.shift.view(shape)

    def __call__(self, images: torch.Tensor, *, channels_last: bool) -> torch.Tensor:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(images.shape, dtype=self.scale.dtype, device=images.device, memory_format=fmt)
        return torch.addcmul(self.shift, images, self.scale, out=out)


class IndexedPrefetchLoader:
    """Wraps a DataLoader of uint8 ``(images, targets, indices)`` chunks and yields normalised device batches.

    The workers load chunks of ``loader.batch_size`` samples (a divisor of ``batch_size``, see
    :func:`chunk_size`); this class joins consecutive chunks into batches of ``batch_size``, so the batches are the
    sampler's order cut every ``batch_size`` samples exactly as one DataLoader of ``batch_size`` would cut it. Why
    chunks: an epoch's first batch then waits for one chunk per worker, decoded in parallel, not for one worker to
    decode a whole batch (on one H100, ResNet-50, 14 workers, that wait cost about 1.1 s per epoch).

    On CUDA the chunks are copied and normalised on a side stream while the current batch trains; on CPU the same
    code runs synchronously. Yields ``(input float/channels_last, target, index)``; ``index`` stays on the CPU,
    where the loss recorder lives.
    """

    def __init__(
        self,
        loader: DataLoader,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
        drop_last: bool = False,
    ):
        self.loader = loader
        self.batch_size = batch_size or loader.batch_size
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.normalize = Normalize(mean, std, device=self.device, dtype=dtype)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _groups(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        return exact_batches(self.loader, self.batch_size, drop_last=self.drop_last)

    def _to_device(self, chunks):
        def join(parts):
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        images = join([c[0].to(self.device, non_blocking=True) for c in chunks])
        targets = join([c[1] for c in chunks]).to(self.device, non_blocking=True)
        indices = join([c[2] for c in chunks])
        return self.normalize(images, channels_last=self.channels_last), targets, indices

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.stream is None:
            yield from (self._to_device(group) for group in self._groups())
            return
        pending = None
        for group in self._groups():
            with torch.cuda.stream(self.stream):
                batch = self._to_device(group)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            for t in batch[:2]:
                t.record_stream(torch.cuda.current_stream(self.device))
            pending = batch
        if pending is not None:
            yield pending

    def __len__(self) -> int:
        n = len(self.loader.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def describe(self) -> str:
        """One line for the run log: the workers and each step of the train transform they apply."""
        return (
            f"{self.loader.num_workers} loader workers, batches of {self.batch_size}: "
            f"{describe_transform(getattr(self.dataset, 'transform', None))}"
        )

    @property
    def sampler(self):
        sampler = self.loader.sampler
        return sampler.sampler if isinstance(sampler, SeededSampler) else sampler

    @property
    def dataset(self):
        return self.loader.dataset


def describe_transform(transform) -> str:
    """A transform's steps on one line: each step's own repr with its whitespace squeezed, RandAugment's op list
    shortened to its layer count and magnitude, and the final to-tensor step left out."""
    steps = getattr(transform, "transforms", [transform])
    parts = []
    for t in steps:
        name = type(t).__name__
        if name in ("MaybePILToTensor", "PILToTensor", "ToTensor"):
            continue
        if name == "RandAugment" and getattr(t, "ops", None):
            parts.append(f"RandAugment(layers={t.num_layers}, magnitude={t.ops[0].magnitude:g})")
        else:
            parts.append(" ".join(repr(t).split()))
    return " > ".join(parts) or "none"


def chunk_size(batch_size: int, num_workers: int) -> int:
    """Samples per worker task: the largest divisor of ``batch_size`` not above ``batch_size / num_workers``
    (rounded up), so a batch is spread over all workers, and at least 4 (each chunk costs a worker task and its
    shared-memory tensors); the whole batch where no divisor from 4 up fits."""
    if num_workers <= 1:
        return batch_size
    target = max(4, -(-batch_size // num_workers))  # more workers than batch / 4: chunks of 4, some workers idle
    chunk = max(d for d in range(1, target + 1) if batch_size % d == 0)
    return chunk if chunk >= 4 else batch_size


def cifar_transform(*, img_size: int = 32, is_training: bool) -> T.Compose:
    """The paper's CIFAR augmentation: 4-pixel padded random crop and horizontal flip (train).

    Images are first resized (short side) and centre-cropped to ``img_size``, a no-op on CIFAR's
    32x32, so a folder of larger or non-square images still batches.
    """
    steps = [T.Resize(img_size), T.CenterCrop(img_size)]
    if is_training:
        steps += [T.RandomCrop(img_size, padding=4), T.RandomHorizontalFlip()]
    return T.Compose([*steps, T.PILToTensor()])


class Uint8RandomErasing:
    """timm's ``RandomErasing`` (``--reprob``) for the uint8 CHW images the loader workers return.

    timm erases in its prefetcher, on normalised device batches, drawing from the main process's generators; here
    each worker erases its own samples, so the draws come from the per-sample seeds (see
    :class:`~dap_pretrain.data.dataset.IndexedDataset`) like the rest of the augmentation. The image is normalised
    with ``mean``/``std`` (0..1 units), erased by timm's own ``RandomErasing`` (same regions, same fill: zeros, or
    normal noise per region or pixel), and mapped back to pixels. Unerased pixels come back exactly; the fill is
    rounded to whole pixel values and clipped to 0..255 (at ImageNet's mean/std, about 3% of ``pixel`` noise values
    lie outside that range).
    """

    def __init__(self, probability: float, *, mode: str, count: int, mean: Sequence[float], std: Sequence[float]):
        from timm.data.random_erasing import RandomErasing

        self.erase = RandomErasing(probability, mode=mode, max_count=count, device="cpu")
        self.shift = torch.tensor(mean).view(-1, 1, 1) * 255
        self.scale = torch.tensor(std).view(-1, 1, 1) * 255

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        state = random.getstate()
        if random.random() > self.erase.probability:  # timm's own first draw: an image left alone costs no copy
            return img
        random.setstate(state)  # timm's erase draws it again, then the regions
        x = self.erase((torch.as_tensor(img).float() - self.shift) / self.scale)
        return (x * self.scale + self.shift).round_().clamp_(0, 255).to(torch.uint8)

    def __repr__(self) -> str:
        e = self.erase
        return f"{type(self).__name__}(p={e.probability}, mode={e.mode}, count={e.max_count})"


def imagenet_transform(*, img_size: int, is_training: bool, **timm_kwargs) -> T.Compose:
    """timm's ImageNet pipeline (RandomResizedCrop 8-100%, 3/4-4/3 aspect, flip) as uint8 tensors."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=is_training, use_prefetcher=True, **timm_kwargs)


def private_generator(seed: int | None = None) -> torch.Generator:
    """A ``DataLoader``'s own generator, so that it never draws from torch's global one.

    Without one, every ``iter(DataLoader)`` draws its workers' base seed from the global generator. Runs sharing a
    process (``dap_pretrain.multirun``) share that generator, so a loader started in one run while another seeded
    and built its model changed that model's initial weights (seen on cpu-2: the same run's epoch-1 loss was 2.018
    or 2.091 beside another run, 2.047 alone). Our augmentation is seeded per sample (:class:`SeededSampler`), so
    the base seed only names the workers; a fixed one loses nothing.
    """
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The augmentation seed of one epoch of a run: every loader derives its randomness from this alone."""
    return (seed + 1) * 1_000_003 + epoch * 1_009 + rank


class SeededSampler:
    """Yields ``(index, seed)`` for each index of ``sampler``'s epoch; the seed is a function of ``(seed, epoch,
    index)`` alone (``sampler.epoch``, 0 where it has none).

    With :class:`~dap_pretrain.data.dataset.IndexedDataset` this makes every sample's augmentation independent of
    the worker that loads it: loader workers can persist across epochs, the worker count can change on resume,
    and a resumed run still repeats each epoch's augmentation exactly.
    """

    def __init__(self, sampler, *, seed: int):
        self.sampler = sampler
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        base = epoch_seed(self.seed, int(getattr(self.sampler, "epoch", 0))) * 2_000_003
        for index in self.sampler:
            yield int(index), (base + int(index)) % 2**63


def uses_cifar_aug(*, img_size: int, aug: str = "auto") -> bool:
    """The trainer's augmentation rule: ``cifar`` or ``imagenet`` as asked; ``auto`` is CIFAR's up to 64 px."""
    return aug == "cifar" or (aug == "auto" and img_size <= 64)


def trainer_transform(
    *,
    img_size: int,
    aug: str = "auto",
    is_training: bool,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    **imagenet_aug,
):
    """The transform the trainer uses for ``img_size`` and ``--aug`` (see :func:`uses_cifar_aug`).

    ``imagenet_aug``: timm ``create_transform`` keywords for the ImageNet train augmentation (``scale``, ``ratio``,
    ``hflip``, ``vflip``, ``color_jitter``, ``auto_augment``, ``interpolation``: bilinear unless given), and
    ``re_prob``, ``re_mode``, ``re_count`` for :class:`Uint8RandomErasing`, which normalises with ``mean``/``std``;
    for evaluation (``is_training=False``), ``crop_pct`` and ``interpolation``. The CIFAR transform takes none
    (``ValueError``; the trainer refuses such flags first, naming them).
    """
    if uses_cifar_aug(img_size=img_size, aug=aug):
        if imagenet_aug:
            raise ValueError(f"the CIFAR transform takes no ImageNet transform keywords: {sorted(imagenet_aug)}")
        return cifar_transform(img_size=img_size, is_training=is_training)
    if not is_training:
        return imagenet_transform(img_size=img_size, is_training=False, **imagenet_aug)
    erasing = {k: imagenet_aug.pop(k) for k in ("re_prob", "re_mode", "re_count") if k in imagenet_aug}
    transform = imagenet_transform(img_size=img_size, is_training=True, **{"interpolation": "bilinear", **imagenet_aug})
    if erasing.get("re_prob", 0) > 0:
        transform.transforms.append(
            Uint8RandomErasing(
                erasing["re_prob"],
                mode=erasing.get("re_mode", "pixel"),
                count=erasing.get("re_count", 1),
                mean=mean,
                std=std,
            )
        )
    return transform


def create_loader(
    dataset,
    *,
    batch_size: int,
    sampler: Sampler | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    num_workers: int = 2,
    drop_last: bool = False,
    channels_last: bool = False,
    pin_memory: bool | None = None,
    seed: int | None = None,
) -> IndexedPrefetchLoader:
    """Build a DataLoader over an :class:`IndexedDataset` (transform already set) and its prefetcher.

    With ``seed``, the sampler is wrapped in :class:`SeededSampler`: each sample's augmentation is drawn from a
    seed of ``(seed, epoch, index)``, so the workers persist across epochs (no per-epoch start-up) and a resumed
    run repeats the augmentation whatever ``num_workers`` is. Without it (evaluation) the order is plain indices.
    """
    device = torch.device(device)
    pin = device.type == "cuda" if pin_memory is None else pin_memory
    loader = DataLoader(
        dataset,
        batch_size=chunk_size(batch_size, num_workers),
        sampler=SeededSampler(sampler, seed=seed) if seed is not None else sampler,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=indexed_uint8_collate,
        pin_memory=pin,
        drop_last=False,  # the prefetcher cuts batches and drops the last partial one
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=private_generator(seed),
    )
    return IndexedPrefetchLoader(
        loader,
        mean=mean,
        std=std,
        device=device,
        channels_last=channels_last,
        batch_size=batch_size,
        drop_last=drop_last,
    )
