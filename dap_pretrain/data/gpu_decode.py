"""GPU JPEG pipeline (``--gpu-decode``): workers read file bytes, the GPU decodes and augments.

Who calls what, and when:

1. :class:`EncodedFiles` is the dataset the loader workers see. Keyed by ``(index, seed)`` from
   :class:`~dap_pretrain.data.loader.SeededSampler`, item ``i`` is the raw bytes of file ``i`` as a 1-D uint8
   tensor, its label, ``i``, the seed, and the sample's augmentation parameters: the worker reads the image size
   from the file's header and draws timm's train augmentation for it from ``random.Random(seed)``
   (:func:`draw_params`: :func:`rrc_params` is timm's ``RandomResizedCropAndInterpolation.get_params``, draw for
   draw; flip with probability ``hflip``; colour jitter factors and order as torchvision's ``ColorJitter``). The
   seed is a function of ``(seed, epoch, index)``, so an epoch's augmentation does not depend on the worker count
   or the batch a sample lands in, and a resumed run repeats it. Reading bytes and a header costs the workers
   almost nothing, so a few of them keep up with any GPU; PIL decoding, the usual bottleneck, leaves the CPU, and
   the per-sample Python of the draws leaves the process that trains.
2. :class:`GpuDecodeLoader` iterates those batches. For each it

   * decodes every JPEG of the batch in one batched nvjpeg call (``torchvision.io.decode_jpeg(..., device)``);
     a file nvjpeg cannot decode (a PNG under a ``.JPEG`` name, CMYK, an odd progressive file) is decoded on the
     CPU by PIL instead, never dropped; a file nothing can decode is a :class:`DataError` naming it;
   * crops and resizes all samples with one ``roi_align`` over a padded batch of their crop regions (bilinear,
     with as many samples per output pixel as the crop is larger than the output, which is what an antialiased
     downscale does), flips, jitters and normalises the whole batch on the device.

   Batches are ``(input, target, index)`` as from :func:`~dap_pretrain.data.loader.create_loader`, so the DaP
   sampler and loss recorder drive this path exactly as the others. A producer thread prepares the next batches
   on a side CUDA stream while the current one trains.

The same code runs on CPU tensors (``device='cpu'``), which is how the tests check it; the trainer only offers it
on CUDA (``--gpu-decode`` elsewhere is refused in one line).
"""

from __future__ import annotations

import io
import logging
import math
import queue
import random
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from dap_pretrain.data.dataset import DataError
from dap_pretrain.data.loader import Normalize, SeededSampler, chunk_size, exact_batches, private_generator
from dap_pretrain.errors import brief

_logger = logging.getLogger(__name__)
# torchvision 0.29 deprecates its decoders in favour of TorchCodec; decode_jpeg still is the batched nvjpeg path.
warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")

_COMPILE_LOCK = threading.Lock()  # torch.compile is not thread-safe
JPEG_MAGIC = b"\xff\xd8\xff"
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


PARAM_FIELDS = ("top", "left", "height", "width", "flip", "op1", "op2", "op3", "brightness", "contrast", "saturation")


class EncodedFiles(Dataset):
    """Item ``(i, seed)``: ``(bytes of file i as a uint8 tensor, label i, i, seed, parameters)``.

    ``parameters`` is a float64 row in :data:`PARAM_FIELDS` order, drawn by :func:`draw_params` for the image size
    in the file's header; NaN where the header cannot be read (the loader then draws after decoding, from the
    same seed, or names the file). A plain index ``i`` gives seed -1 and NaN parameters.

    Args:
        samples: ``(path, label)`` pairs in dataset index order (a timm ImageFolder reader's ``samples``).
        scale, ratio, hflip, jitter: the augmentation (see :func:`draw_params`).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str | Path, int]],
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        jitter: float = 0.4,
    ):
        self.samples = [(str(p), int(t)) for p, t in samples]
        self.aug = {"scale": tuple(scale), "ratio": tuple(ratio), "hflip": float(hflip), "jitter": float(jitter)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> tuple[torch.Tensor, int, int, int, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, -1)
        path, target = self.samples[index]
        data = Path(path).read_bytes()
        size = header_size(data) if seed >= 0 else None
        drawn = draw_params(*size, rng=random.Random(seed), **self.aug) if size else (math.nan,) * len(PARAM_FIELDS)
        params = torch.tensor(drawn, dtype=torch.float64)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), target, int(index), int(seed), params


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from an image file's header (PIL reads no pixels for it); None if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception:  # PIL raises many types for a bad file; decoding it later names the file
        return None
    return height, width


def draw_params(
    height: int,
    width: int,
    *,
    rng: random.Random,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    jitter: float,
) -> tuple[float, ...]:
    """One sample's augmentation in :data:`PARAM_FIELDS` order, drawn in timm's order: crop, flip, jitter.

    With ``jitter`` 0 nothing is drawn for it: order (0, 1, 2) and factors 1.
    """
    box = rrc_params(height, width, scale=scale, ratio=ratio, rng=rng)
    flip = rng.random() < hflip
    order, factors = jitter_params(jitter, rng) if jitter > 0 else ((0, 1, 2), (1.0, 1.0, 1.0))
    return (*box, float(flip), *order, *factors)


def encoded_collate(batch: list[tuple]) -> torch.Tensor:
    """Collate :class:`EncodedFiles` items into one uint8 tensor; :func:`unpack_encoded` reads it back.

    Each tensor a worker hands over is a shared-memory segment of its own (on one H100, one tensor per file halved
    the pipeline's rate: RESULTS section 9, run 2), so a chunk travels as one: the item count (int64), then per
    item an int64 row (end offset of its bytes, target, index, seed), then its float64 :data:`PARAM_FIELDS` row,
    then all files' bytes. Every part starts at a multiple of 8 bytes, so it is read back as a view.
    """
    n = len(batch)
    meta = torch.tensor([(b[0].numel(), b[1], b[2], b[3]) for b in batch], dtype=torch.int64).view(n, 4)
    meta[:, 0] = meta[:, 0].cumsum(0)
    params = torch.stack([b[4] for b in batch]) if batch else torch.empty(0, len(PARAM_FIELDS), dtype=torch.float64)
    head = [torch.tensor([n], dtype=torch.int64).view(torch.uint8), meta.view(-1).view(torch.uint8)]
    return torch.cat([*head, params.reshape(-1).view(torch.uint8), *(b[0] for b in batch)])


def unpack_encoded(packed: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """:func:`encoded_collate`'s tensor as ``(each file's bytes, meta (n, 4) int64, parameters (n, 11) float64)``,
    all views of it, no copy."""
    n = int(packed[:8].view(torch.int64))
    meta_end = 8 + 32 * n
    params_end = meta_end + 8 * len(PARAM_FIELDS) * n
    meta = packed[8:meta_end].view(torch.int64).view(n, 4)
    params = packed[meta_end:params_end].view(torch.float64).view(n, len(PARAM_FIELDS))
    return split_encoded(packed[params_end:], meta[:, 0]), meta, params


def split_encoded(flat: torch.Tensor, ends: torch.Tensor) -> list[torch.Tensor]:
    """The per-file byte tensors of :func:`encoded_collate`'s ``flat``: contiguous views, no copy."""
    starts = [0, *ends[:-1].tolist()] if len(ends) else []
    return [flat[a:b] for a, b in zip(starts, ends.tolist(), strict=True)]


def dataset_samples(dataset) -> list[tuple[str, int]]:
    """The ``(path, label)`` list of an :class:`IndexedDataset` over a timm ImageFolder.

    Raises:
        DataError: the dataset is not a folder of image files (e.g. a torchvision CIFAR object).
    """
    samples = dataset.samples
    if not samples:
        raise DataError(
            "--gpu-decode reads image files from an ImageFolder tree; this dataset has no file list "
            f"({type(dataset.dataset).__name__}): pass --data-dir with class folders, or drop --gpu-decode"
        )
    return [(str(p), int(t)) for p, t in samples]


def rrc_params(
    height: int, width: int, *, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """timm's ``RandomResizedCropAndInterpolation.get_params``, drawing from ``rng``: returns ``(top, left, h, w)``.

    Ten tries at an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio`` that fits the
    image; otherwise the central crop clamped to ``ratio``. With ``rng`` seeded as the ``random`` module was, the
    result equals timm's draw for draw (tests/data/test_gpu_decode.py checks it).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def jitter_params(strength: float, rng: random.Random) -> tuple[tuple[int, ...], tuple[float, float, float]]:
    """torchvision ``ColorJitter(strength, strength, strength)``'s draw: an op order and three factors.

    Returns ``(order, (brightness, contrast, saturation))``; ``order`` is a permutation of ``(0, 1, 2)`` (torchvision
    permutes four ops, the fourth being hue, which timm leaves off). Factors are uniform on
    ``[max(0, 1 - strength), 1 + strength]``.
    """
    order = [0, 1, 2]
    rng.shuffle(order)
    lo = max(0.0, 1.0 - strength)
    return tuple(order), (rng.uniform(lo, 1 + strength), rng.uniform(lo, 1 + strength), rng.uniform(lo, 1 + strength))


def _gray(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` luma of a ``(B, 3, H, W)`` batch: two fused multiply-adds, no ``(B, 3, H, W)`` temporary."""
    r, g, b = GRAY_WEIGHTS
    return (x[:, 0:1] * r).add_(x[:, 1:2], alpha=g).add_(x[:, 2:3], alpha=b)


def color_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-sample brightness / contrast / saturation on a float batch in 0..255, each sample in its own order.

    Args:
        x: ``(B, 3, H, W)`` float, 0..255; modified in place and returned.
        order: ``(B, 3)`` int, each row a permutation of 0 (brightness), 1 (contrast), 2 (saturation).
        factors: ``(B, 3)`` float, the three factors per sample.

    Each op is torchvision's blend ``factor * x + (1 - factor) * other``, clamped to 0..255, with ``other`` zero
    (brightness), the mean of the grey image (contrast) or the grey image (saturation). So at each of the three
    rounds one blend serves the whole batch: every sample takes its own round's factor ``f``, and its
    ``(1 - f) * other`` is ``a * grey + b`` with per-sample ``a = (1 - f) [saturation]`` and
    ``b = (1 - f) mean(grey) [contrast]``: a one-channel ``addcmul``, then ``x = x * f + that`` written over ``x``,
    then the clamp. About a quarter of the memory traffic of computing all three ops for every sample and
    selecting, and the same values.
    """
    f = factors.to(x.dtype)
    rows = torch.arange(len(x), device=x.device)
    for k in range(3):
        op = order[:, k]
        fk = f[rows, op].view(-1, 1, 1, 1)
        gray = _gray(x)
        a = (op == 2).to(x.dtype).view(-1, 1, 1, 1) * (1 - fk)
        b = (op == 1).to(x.dtype).view(-1, 1, 1, 1) * (1 - fk) * gray.mean(dim=(1, 2, 3), keepdim=True)
        torch.addcmul(torch.addcmul(b, gray, a), x, fk, out=x).clamp_(0, 255)
    return x


def finish_crops(
    x: torch.Tensor,
    flip: torch.Tensor,
    order: torch.Tensor | None,
    factors: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    channels_last: bool,
) -> torch.Tensor:
    """Flip, colour jitter and normalise a batch of crops, out of place: what ``GpuDecodeLoader.augment`` does after
    ``roi_align``, written for ``torch.compile`` to fuse (``GpuDecodeLoader(fuse=True)``).

    Args:
        x: ``(B, 3, S, S)`` float crops in 0..255 (not modified).
        flip: ``(B,)`` bool, which samples to flip left-right.
        order, factors: :func:`color_jitter`'s ``(B, 3)`` op order and factors; ``None`` for no jitter.
        scale, shift: :class:`~dap_pretrain.data.loader.Normalize`'s ``(1, 3, 1, 1)`` terms; the result has their
            dtype.
        channels_last: the memory format of the result.

    The same arithmetic as the eager steps (the flipped rows, :func:`color_jitter`, ``Normalize``), so the same
    values up to float rounding (tested). Eager, it reads and writes the batch more often than those in-place steps;
    compiled, each jitter round is a per-sample reduction (the grey mean) and one element-wise pass, and the flip
    and the normalisation fold into those passes: a few passes over the batch (each round's mean needs the previous
    round's result) instead of about thirty kernels.
    """
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if order is not None and factors is not None:
        f = factors.to(x.dtype)
        r, g, b = GRAY_WEIGHTS
        for k in range(3):
            op = order[:, k : k + 1]
            fk = f.gather(1, op).view(-1, 1, 1, 1)
            op = op.view(-1, 1, 1, 1)
            gray = x[:, 0:1] * r + x[:, 1:2] * g + x[:, 2:3] * b
            other = torch.where(op == 2, gray, torch.where(op == 1, gray.mean(dim=(1, 2, 3), keepdim=True), 0.0))
            x = (x * fk + other * (1 - fk)).clamp(0, 255)
    out = x.to(scale.dtype) * scale + shift
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def decode_batch(
    data: list[torch.Tensor], *, device: torch.device, paths: Sequence[str] = (), stats: dict | None = None
) -> list[torch.Tensor]:
    """Decode a batch of encoded images to ``(3, H, W)`` uint8 tensors on ``device``; never drops one.

    JPEGs (by their first bytes, not their names) go through one batched ``decode_jpeg`` call on ``device``; if
    that fails, each is tried alone; whatever nvjpeg refuses, and every non-JPEG, is decoded by PIL on the CPU and
    moved to ``device`` (counted in ``stats['cpu']`` when a dict is given).

    Raises:
        DataError: a file neither decoder can read, named with its path.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(data)
    jpeg = [i for i, d in enumerate(data) if d.numpy()[:3].tobytes() == JPEG_MAGIC]  # no torch op per file
    if jpeg:
        try:
            decoded = decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
            for i, img in zip(jpeg, decoded, strict=True):
                out[i] = img
        except RuntimeError:
            for i in jpeg:
                try:
                    out[i] = decode_jpeg(data[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass
    for i, img in enumerate(out):
        if img is None or img.shape[0] != 3:
            out[i] = _pil_decode(data[i], paths[i] if i < len(paths) else f"batch item {i}").to(device)
            if stats is not None:
                stats["cpu"] = stats.get("cpu", 0) + 1
    return out  # type: ignore[return-value]


def _pil_decode(data: torch.Tensor, name: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for a bad file
        raise DataError(f"cannot decode image {name} ({type(e).__name__}: {e}); remove or replace the file") from e
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def crop_regions(images: list[torch.Tensor], boxes: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each image cut (a view, no copy) to its box ``(top, left, h, w)`` and the one-pixel border around it that
    :func:`resized_crops`'s bilinear samples read, with each box in its cut's coordinates.

    A sample of ``roi_align(aligned=True)`` lies less than half a pixel inside the box, so it reads at most one
    row or column beyond the box on each side. Where the box meets the image's edge the border is not there, and
    :func:`pad_batch` repeats the edge instead, as for a whole image.
    """
    corner = (boxes[:, :2] - 1).clamp(min=0)  # each cut's top-left corner in its image
    cuts = [
        im[:, r0 : top + h + 1, c0 : left + w + 1]  # slicing stops at the image's edge
        for im, (r0, c0), (top, left, h, w) in zip(images, corner.tolist(), boxes.tolist(), strict=True)
    ]
    local = boxes.clone()
    local[:, :2] -= corner  # one op per batch, not two tensor writes per image
    return cuts, local


def resized_crops(
    images: list[torch.Tensor],
    boxes: torch.Tensor,
    size: int,
    *,
    pad: str = "copies",
    fill: float | None = None,
    cut: bool = True,
) -> torch.Tensor:
    """Crop ``boxes[k] = (top, left, h, w)`` from ``images[k]``, resize each to ``size`` px square: ``(B, 3, S, S)``.

    One ``torchvision.ops.roi_align`` over the padded float batch (``aligned=True``: pixel centres at +0.5, as in
    PIL and ``interpolate(align_corners=False)``). Its adaptive sampling averages ``ceil(h / size)`` x
    ``ceil(w / size)`` bilinear samples per output pixel, so a downscale is antialiased; an upscale is plain
    bilinear. A crop that reaches an image's right or bottom edge samples up to half a pixel beyond it, where
    bilinear interpolation reads the next column or row: :func:`pad_batch` repeats each image's last column and
    row there, so no padding zero darkens the edge. Nothing else of the padded batch is read, so it is left
    unwritten (``fill`` None; the tests fill NaN to show that none of it reaches a crop).

    ``cut`` (the default) pads only each crop's region (:func:`crop_regions`), not its whole image: the same
    crops to float rounding, for about half the pixels converted and copied (RandomResizedCrop's boxes cover 8-100%
    of an image). ``cut=False`` pads whole images, as before (the tests compare the two).
    """
    from torchvision.ops import roi_align

    if cut:
        images, boxes = crop_regions(images, boxes)
    batch = pad_batch(images, method=pad, dtype=torch.float32, fill=fill)
    dev = batch.device
    b = boxes.to(dev, torch.float32)
    item = torch.arange(len(images), device=dev, dtype=torch.float32)
    rois = torch.stack([item, b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], dim=1)  # (k, x1, y1, x2, y2)
    return roi_align(batch, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


PAD_METHODS = ("copies", "nested")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _pad_method(method: str) -> str:
    if method not in PAD_METHODS:
        raise ValueError(f"pad method {method!r}: use one of {PAD_METHODS}")
    return method


def pad_batch(
    images: list[torch.Tensor], *, method: str = "copies", dtype: torch.dtype = torch.uint8, fill: float | None = 0
) -> torch.Tensor:
    """``(3, h_k, w_k)`` uint8 images -> one ``(B, 3, H + 1, W + 1)`` batch of ``dtype``, image ``k`` at the top left.

    ``method``: ``"copies"`` copies each image into the batch, converting it to ``dtype`` on the way (one copy
    kernel per image); ``"nested"`` packs the images into a nested tensor and pads that (a few kernels per batch;
    an experiment for the GPU, where the profile shows per-image kernels: RESULTS section 9), then converts. Both
    give the same batch (tested).
    Each image's last column is repeated in column ``w_k`` and its last row in row ``h_k`` (the corner too), in
    two batched index copies. The rest of the batch is ``fill`` with ``"copies"`` (``None`` leaves it unwritten:
    one pass fewer over the whole batch, for a caller that never reads it, :func:`resized_crops`), zero with
    ``"nested"``.
    """
    method = _pad_method(method)
    dev = images[0].device
    hs = torch.tensor([int(im.shape[1]) for im in images])
    ws = torch.tensor([int(im.shape[2]) for im in images])
    hmax, wmax = int(hs.max()) + 1, int(ws.max()) + 1
    if method == "nested":
        nested = torch.nested.as_nested_tensor(images)  # one buffer, one batched copy
        if dtype.is_floating_point:  # before padding: CUDA pads in one kernel for float, double and half only
            nested = nested.to(dtype)
        batch = torch.nested.to_padded_tensor(nested, 0, output_size=(len(images), 3, hmax, wmax)).to(dtype)
    else:
        shape = (len(images), 3, hmax, wmax)
        batch = torch.empty(shape, dtype=dtype, device=dev)
        if fill is not None:
            batch.fill_(fill)
        for k, im in enumerate(images):
            batch[k, :, : im.shape[1], : im.shape[2]].copy_(im)
    hs, ws = hs.to(dev).view(-1, 1), ws.to(dev).view(-1, 1)
    k = torch.arange(len(images), device=dev).view(-1, 1)
    y = torch.minimum(torch.arange(hmax, device=dev).view(1, -1), hs - 1)  # (B, H+1): rows 0..h-1, repeated
    batch[k, :, y, ws] = batch[k, :, y, ws - 1]  # column w_k := column w_k - 1
    x = torch.minimum(torch.arange(wmax, device=dev).view(1, -1), ws)  # (B, W+1): columns 0..w, repeated
    batch[k, :, hs, x] = batch[k, :, hs - 1, x]  # row h_k := row h_k - 1 (its column w_k included)
    return batch


class GpuDecodeLoader:
    """Batches ``(input, target, index)`` of timm's train augmentation, decoded and augmented on ``device``.

    Args:
        samples: ``(path, label)`` per dataset index (:func:`dataset_samples`).
        sampler: the epoch's index order (the DaP sampler; its ``epoch`` and ``seed`` seed each sample's
            augmentation, through :class:`~dap_pretrain.data.loader.SeededSampler`).
        batch_size: images per batch (per process).
        img_size: output side in pixels.
        mean, std: normalisation in 0..1 units.
        device: where decoding and augmentation run.
        num_workers: loader processes reading file bytes and drawing the augmentation (persistent across epochs).
        seed: the run's seed.
        scale, ratio, hflip, color_jitter: timm's ``transforms_imagenet_train`` defaults.
        drop_last: drop each epoch's last partial batch.
        chunk: the workers read chunks of a batch (:func:`~dap_pretrain.data.loader.chunk_size`, 16 files for a
            batch of 256 and 14 workers) that the loader joins into exactly the batches of ``batch_size`` the
            sampler's order gives, so an epoch's first batch waits for one chunk per worker, read in parallel, not
            for one worker to read a whole batch. ``False``: one worker per batch, as before.
        channels_last: return channels-last batches.
        prefetch: batches prepared ahead by the producer thread.
        pin_memory: the workers' byte batches are copied to pinned memory before decoding (CUDA only).
        pad: how the decoded images become one batch (:func:`pad_batch`).
        dtype: the dtype of the returned batches. ``torch.float16`` or ``torch.bfloat16`` (the AMP dtype, to which
            the model's first layer casts its input anyway) also flips and jitters the crops in ``float16``, half
            the memory traffic of ``float32``; crops are always resized in ``float32`` (``roi_align`` computes its
            sampling positions in its input's dtype, too coarse in half precision beyond a few hundred pixels).
        fuse: flip, jitter and normalise with :func:`finish_crops` under ``torch.compile``: a few fused passes
            per batch instead of about thirty kernels; the arithmetic is float32, the result ``dtype`` (so the
            float16 flip and jitter above do not apply). It is compiled once, for any batch size, in the thread that
            first iterates the loader, before the producer thread starts (torch.compile is not thread-safe, and a
            compile on the producer thread could meet the model's own ``--torchcompile``). If that compile fails (no
            compiler for the device), one warning says why and the loader finishes batches as without ``fuse``;
            ``fused`` tells which. The producer thread never compiles: it runs the compiled function under
            ``torch._dynamo.run`` (prior compiles only), so a batch the graph's guards refuse (one sample, which
            dynamo specialises) is finished by :func:`finish_crops` eagerly, the same arithmetic.

    ``pin_memory``, ``pad`` and ``dtype`` are the experiments the H100 profile suggested. An H100 A/B (RESULTS
    section 9, run 6) kept one: the trainer passes its AMP dtype; pinned bytes and nested padding stay off.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        *,
        sampler,
        batch_size: int,
        img_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        num_workers: int = 4,
        seed: int = 0,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        drop_last: bool = False,
        channels_last: bool = False,
        prefetch: int = 2,
        pin_memory: bool = False,
        pad: str = "copies",
        dtype: torch.dtype = torch.float32,
        fuse: bool = False,
        chunk: bool = True,
    ):
        self.files = EncodedFiles(samples, scale=scale, ratio=ratio, hflip=hflip, jitter=color_jitter)
        self.sampler = sampler
        self.batch_size = batch_size
        self.img_size = img_size
        self.device = torch.device(device)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.prefetch = max(1, prefetch)
        self.pad = _pad_method(pad)
        if dtype not in HALF_DTYPES + (torch.float32,):
            raise ValueError(f"dtype {dtype}: use torch.float32, torch.float16 or torch.bfloat16")
        self.work_dtype = torch.float16 if dtype in HALF_DTYPES else torch.float32  # flip and jitter
        self.normalize = Normalize(mean, std, device=self.device, dtype=dtype)
        self.fuse = bool(fuse)
        self.fused: bool | None = None  # with fuse: True once compiled, False after a failed compile
        self._finish = torch.compile(finish_crops) if self.fuse else None
        self.loader = DataLoader(
            self.files,
            batch_size=chunk_size(batch_size, num_workers) if chunk else batch_size,
            sampler=SeededSampler(sampler, seed=seed),
            num_workers=num_workers,
            collate_fn=encoded_collate,
            drop_last=False,  # encoded_batches cuts the batches and drops the last partial one
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            pin_memory=pin_memory and self.device.type == "cuda",
            generator=private_generator(seed),
        )
        self.stats: dict = {}  # files PIL decoded because nvjpeg refused them (this epoch)

    def describe(self) -> str:
        """One line for the run log."""
        aug = self.files.aug
        return (
            f"GPU JPEG pipeline: {len(self.files)} files, batched decode + RandomResizedCrop{aug['scale']}/"
            f"ratio{tuple(round(r, 4) for r in aug['ratio'])} + flip {aug['hflip']} + jitter {aug['jitter']} on "
            f"{self.device}" + (" (flip, jitter and normalise fused by torch.compile)" if self.fuse else "")
        )

    def __len__(self) -> int:
        n = len(self.loader.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def encoded_batches(
        self,
    ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The epoch's batches as the workers hand them over, before decoding: ``(each file's bytes, targets,
        indices, seeds, parameters)``, the chunks joined into batches of exactly ``batch_size``."""
        chunks = (
            (data, meta[:, 1], meta[:, 2], meta[:, 3], params)
            for data, meta, params in map(unpack_encoded, self.loader)
        )
        for group in exact_batches(chunks, self.batch_size, drop_last=self.drop_last):
            if len(group) == 1:
                yield group[0]
            else:
                fields = list(zip(*group, strict=True))
                yield ([d for part in fields[0] for d in part], *(torch.cat(f) for f in fields[1:]))

    @property
    def dataset(self):
        return self.files

    def augment(
        self,
        data: list[torch.Tensor],
        params: torch.Tensor,
        seeds: torch.Tensor | None = None,
        paths: Sequence[str] = (),
    ) -> torch.Tensor:
        """Decode and augment one batch with its drawn ``params`` (``(B, len(PARAM_FIELDS))``, from the workers);
        a NaN row (header unreadable) is drawn here from its seed once the image is decoded."""
        t0 = time.perf_counter()
        images = decode_batch(data, device=self.device, paths=paths, stats=self.stats)
        t1 = time.perf_counter()
        missing = torch.isnan(params[:, 0]).nonzero().flatten().tolist()
        if missing:
            params = params.clone()
            for k in missing:
                if seeds is None or int(seeds[k]) < 0:
                    raise ValueError(f"batch item {k} has no augmentation parameters and no seed to draw them from")
                h, w = int(images[k].shape[1]), int(images[k].shape[2])
                params[k] = torch.tensor(draw_params(h, w, rng=random.Random(int(seeds[k])), **self.files.aug))
        x = resized_crops(images, params[:, :4].round().long(), self.img_size, pad=self.pad)
        if self.fused:
            x = self._finish_fused(x, params)
        else:
            x = self._finish_eager(x.to(self.work_dtype), params)
        self.stats["decode_s"] = self.stats.get("decode_s", 0.0) + t1 - t0  # host seconds (nvjpeg waits for itself)
        self.stats["augment_s"] = self.stats.get("augment_s", 0.0) + time.perf_counter() - t1  # host launch time
        return x

    def _fused_args(self, x: torch.Tensor, params: torch.Tensor) -> tuple:
        p = params[:, 4:11].to(self.device, torch.float32)  # flip, jitter order and factors: one copy per batch
        flip, order, factors = p[:, 0] != 0, None, None
        if self.files.aug["jitter"] > 0:
            order = p[:, 1:4].long()
            factors = p[:, 4:7].contiguous()  # strides as compiled, never a recompile
        return x, flip, order, factors, self.normalize.scale, self.normalize.shift

    def _finish_fused(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Flip, jitter, normalise with the compiled :func:`finish_crops`; never compiles (see ``fuse``)."""
        return self._run_compiled(*self._fused_args(x, params), channels_last=self.channels_last)

    def _compile_fused(self) -> None:
        """With ``fuse``: compile :func:`finish_crops` on a dummy batch whose size is marked dynamic, so one graph
        serves every batch size; on failure, warn once and finish batches eagerly (``fused`` False)."""
        if not self.fuse or self.fused is not None:
            return
        n, size = max(2, self.batch_size), self.img_size
        x = torch.full((n, 3, size, size), 128.0, device=self.device)
        params = torch.zeros(n, len(PARAM_FIELDS))
        params[:, 5:8] = torch.tensor([0.0, 1.0, 2.0])
        params[:, 8:11] = 1.0
        args = self._fused_args(x, params)
        from torch import _dynamo

        for t in args[:4]:
            if t is not None:
                _dynamo.maybe_mark_dynamic(t, 0)
        try:
            with _COMPILE_LOCK:  # runs sharing a process (dap_pretrain.multirun) compile one at a time
                self._finish(*args, channels_last=self.channels_last)
            self._run_compiled = _dynamo.run(self._finish)  # what was compiled here, and never a compile
            self.fused = True
        except Exception as e:  # the backend could not build here (no C++ compiler, no Triton, ...)
            _logger.warning(
                "GPU pipeline: --fuse could not compile with torch.compile (%s); finishing batches unfused", brief(e)
            )
            self.fused = False

    def _finish_eager(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Flip, jitter, normalise in place, step by step (the default)."""
        flipped = params[:, 4].nonzero().flatten()
        if len(flipped):  # only the flipped half is read and written again
            rows = flipped.to(self.device)
            x.index_copy_(0, rows, x.index_select(0, rows).flip(-1))
        if self.files.aug["jitter"] > 0:
            dev = self.device
            x = color_jitter(x, params[:, 5:8].long().to(dev), params[:, 8:11].to(dev, self.work_dtype))
        return self.normalize(x, channels_last=self.channels_last)

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        self.stats = {}
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            for data, targets, indices, seeds, params in self.encoded_batches():
                if stop.is_set():
                    return
                paths = [self.files.samples[i][0] for i in indices.tolist()]
                if stream is not None:
                    with torch.cuda.stream(stream):
                        x = self.augment(data, params, seeds, paths)
                        y = targets.to(self.device, non_blocking=True)
                        ready = torch.cuda.Event()
                        ready.record(stream)
                else:
                    x = self.augment(data, params, seeds, paths)
                    y, ready = targets, None
                out.put((x, y, indices, ready))
        except BaseException as e:  # handed to the consumer, which raises it in the training thread
            out.put(e)
            return
        out.put(None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._compile_fused()  # here, before the producer thread exists
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(q, stop), daemon=True, name="gpu-decode")
        producer.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    if self.stats.get("cpu"):
                        _logger.warning(
                            "%d images of this epoch were decoded by PIL: nvjpeg refused them", self.stats["cpu"]
                        )
                    return
                if isinstance(item, BaseException):
                    raise item
                x, y, indices, ready = item
                if ready is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(ready)
                    x.record_stream(current)
                    y.record_stream(current)
                yield x, y, indices
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
            producer.join()
