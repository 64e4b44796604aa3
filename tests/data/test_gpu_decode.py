"""The GPU JPEG pipeline, run on CPU tensors: timm parity of the augmentation, index alignment, no dropped files."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import functional as TF

from dap_pretrain.data.dataset import DataError
from dap_pretrain.data.gpu_decode import (
    PARAM_FIELDS,
    GpuDecodeLoader,
    color_jitter,
    crop_regions,
    decode_batch,
    encoded_collate,
    header_size,
    pad_batch,
    resized_crops,
    rrc_params,
    unpack_encoded,
)

REPO = Path(__file__).resolve().parents[2]
# tests/conftest.py's SHARED_DATA; imported, `conftest` resolved to tests/mm/conftest.py when both dirs were run
SHARED_DATA = next((p for p in (REPO.parent / "shared" / "data", REPO / "shared" / "data") if p.is_dir()), Path())
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on a GPU machine the same tests run on it


def _imagenet_files(n: int) -> list[str]:
    return sorted(str(p) for p in (SHARED_DATA / "imagenet_sample").glob("*/*.JPEG"))[:n]


@pytest.mark.parametrize("size", [(256, 341), (256, 256), (500, 60), (60, 500), (3, 1000)])
def test_rrc_params_equal_timm_draw_for_draw(size):

    h, w = size
    img = Image.new("RGB", (w, h))
    for seed in range(200):
        random.seed(seed)
        theirs = RandomResizedCropAndInterpolation.get_params(img, SCALE, RATIO)
        ours = rrc_params(h, w, scale=SCALE, ratio=RATIO, rng=random.Random(seed))
        assert ours == theirs, (seed, size)


def _timm_ops(pil: Image.Image, box, flip: bool, order, factors, size: int) -> torch.Tensor:
    """timm's train transform applied with given parameters: RRC (PIL bilinear), flip, ColorJitter ops."""
    i, j, h, w = box
    out = TF.resized_crop(pil, i, j, h, w, [size, size], interpolation=TF.InterpolationMode.BILINEAR)
    if flip:
        out = TF.hflip(out)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for k in order:
        out = ops[k](out, factors[k])
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float()


def test_augmentation_matches_timm_transform_with_the_same_parameters():
    """Per image, our decode + crop + flip + jitter against timm's PIL ops with the parameters we drew."""
    files = _imagenet_files(48)
    loader = GpuDecodeLoader(
        [(f, 0) for f in files], sampler=range(len(files)), batch_size=48, img_size=224, mean=(0, 0, 0),
        std=(1 / 255, 1 / 255, 1 / 255), device=torch.device("cpu"), num_workers=0,
    )  # fmt: skip
    items = [loader.files[(k, 1000 + k)] for k in range(len(files))]  # drawn as a loader worker draws them
    params = torch.stack([item[4] for item in items])
    ours = loader.augment([item[0] for item in items], params)
    assert ours.shape == (48, 3, 224, 224)
    diffs = []
    for k, f in enumerate(files):
        with Image.open(f) as im:
            pil = im.convert("RGB")
        row = params[k].tolist()
        box, flip, order = tuple(int(v) for v in row[:4]), bool(row[4]), tuple(int(v) for v in row[5:8])
        ref = _timm_ops(pil, box, flip, order, row[8:11], 224)
        diffs.append((ours[k] - ref).abs().mean().item())
    diffs = np.array(diffs)
    # Two JPEG decoders (libjpeg-turbo in PIL, torchvision's on CPU here; nvjpeg on the GPU) and two resamplers
    # (PIL's bilinear filter, roi_align's bilinear average) differ by a few grey levels out of 255, not more.
    assert np.median(diffs) < 2.0 and diffs.max() < 3.0, diffs  # measured: 1.46 and 1.97
    # Without parameters in common the outputs would differ by tens of levels: the test can fail.
    shuffled = np.mean([(ours[k] - ours[(k + 1) % 48]).abs().mean().item() for k in range(48)])
    assert shuffled > 20


def test_worker_draws_are_timms_for_the_decoded_size():
    """The worker reads the size from the header, and draws what timm draws for that size with the sample's seed;
    a sample whose header could not be read is drawn after decoding from the same seed, to the same values."""
    files = _imagenet_files(6)
    loader = GpuDecodeLoader(
        [(f, 0) for f in files], sampler=range(6), batch_size=6, img_size=32, mean=(0,) * 3, std=(1,) * 3,
        device=torch.device("cpu"), num_workers=0,
    )  # fmt: skip
    for k, f in enumerate(files):
        data, _, index, seed, params = loader.files[(k, 77 + k)]
        decoded = decode_batch([data], device=torch.device("cpu"))[0]
        assert header_size(data.numpy().tobytes()) == tuple(decoded.shape[1:])
        random.seed(77 + k)
        with Image.open(f) as im:
            box = RandomResizedCropAndInterpolation.get_params(im, SCALE, RATIO)
        assert (index, seed) == (k, 77 + k) and tuple(int(v) for v in params[:4]) == box
        assert 0.6 <= params[8:].min() and params[8:].max() <= 1.4 and sorted(params[5:8].tolist()) == [0, 1, 2]
    items = [loader.files[(k, 5 + k)] for k in range(6)]
    params = torch.stack([item[4] for item in items])
    unread = params.clone()
    unread[[1, 4]] = math.nan
    seeds = torch.tensor([5 + k for k in range(6)])
    data = [item[0] for item in items]
    assert torch.equal(loader.augment(data, unread, seeds), loader.augment(data, params))


def test_batches_do_not_depend_on_workers_or_batch_size():
    """Each sample's augmentation comes from its own seed: 0 or 2 workers, batches of 3 or 6, the same pixels."""
    files = _imagenet_files(6)

    class Epoch(list):
        epoch = 2

    def pixels(workers: int, batch: int) -> torch.Tensor:
        loader = GpuDecodeLoader(
            [(f, 0) for f in files], sampler=Epoch([4, 1, 0, 5, 2, 3]), batch_size=batch, img_size=32,
            mean=(0.5,) * 3, std=(0.25,) * 3, device=torch.device("cpu"), num_workers=workers, seed=3,
        )  # fmt: skip
        return torch.cat([x for x, _, _ in loader])

    reference = pixels(0, 6)
    assert torch.equal(pixels(2, 3), reference) and torch.equal(pixels(0, 3), reference)


def test_parameter_statistics_match_timm():
    """Area fraction, aspect and flip rate of our draws match timm's RandomResizedCrop + RandomHorizontalFlip."""

    h, w = 256, 341
    img = Image.new("RGB", (w, h))
    rng = random.Random(1)
    ours = [rrc_params(h, w, scale=SCALE, ratio=RATIO, rng=rng) for _ in range(4000)]
    random.seed(2)
    theirs = [RandomResizedCropAndInterpolation.get_params(img, SCALE, RATIO) for _ in range(4000)]
    for stat in (lambda b: b[2] * b[3] / (h * w), lambda b: b[3] / b[2]):
        a, t = np.array([stat(b) for b in ours]), np.array([stat(b) for b in theirs])
        assert abs(a.mean() - t.mean()) < 0.03 * t.mean()
        assert abs(np.median(a) - np.median(t)) < 0.05 * np.median(t)


def test_color_jitter_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 20, 24), generator=g).float()
    orders = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0], [0, 2, 1], [2, 0, 1]])
    factors = torch.rand(6, 3, generator=g) * 0.8 + 0.6
    ours = color_jitter(x.clone(), orders, factors)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for k in range(6):
        ref = x[k] / 255
        for op in orders[k].tolist():
            ref = ops[op](ref, float(factors[k, op]))
        torch.testing.assert_close(ours[k], ref * 255, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_crops_reaching_an_image_edge_read_no_padding(device):
    """Solid images of different sizes in one padded batch, crops touching their edges: every output pixel keeps
    the image's value. A bilinear sample half a pixel past the edge must not read the padding, which is filled with
    NaN here (in the loader it is left unwritten), so a single padding value read anywhere would show."""
    sizes = [(30, 40), (64, 50), (17, 90), (64, 90), (1, 1), (2, 7)]
    images = [torch.full((3, h, w), 10 + 40 * k, dtype=torch.uint8, device=device) for k, (h, w) in enumerate(sizes)]
    boxes = torch.tensor(
        [[0, 0, 30, 40], [20, 11, 44, 39], [5, 60, 12, 30], [0, 0, 64, 90], [0, 0, 1, 1], [1, 6, 1, 1]]
    )
    for fill in (math.nan, None):
        out = resized_crops(images, boxes, 24, fill=fill)
        for k in range(len(images)):
            err = (out[k] - (10 + 40 * k)).abs().max().item()  # NaN if a padding value was read
            assert err < 1e-3, (k, fill, out[k].min().item(), out[k].max().item())
    # and a crop is a crop: a horizontal ramp cropped at its right end keeps the ramp's top values
    ramp = torch.arange(90, dtype=torch.uint8, device=device).expand(3, 64, 90).contiguous()
    edge = resized_crops([ramp, images[0]], torch.tensor([[0, 60, 64, 30], [0, 0, 30, 40]]), 30)[0]
    assert abs(edge[:, :, -1].mean().item() - 89) < 0.6 and abs(edge[:, :, 0].mean().item() - 60) < 0.6


@pytest.mark.parametrize("device", DEVICES)
def test_cutting_each_image_to_its_crop_region_changes_no_crop(device):
    """The loader pads only each crop's region and the one-pixel border its bilinear samples read, not the whole
    image: on noise images, with boxes anywhere (inside, at every edge, one pixel, whole image), the crops equal
    those from whole images to float rounding, and no padding (NaN) is read. A border too thin, or a box moved
    into its cut wrongly, changes the noise the samples see."""
    g = torch.Generator().manual_seed(0)
    sizes = [(30, 40), (64, 50), (17, 90), (1, 1), (2, 7), (100, 120)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).to(device) for h, w in sizes]
    rng = random.Random(0)
    for trial in range(40):
        boxes = []
        for h, w in sizes:
            top, left = (0, 0) if trial == 0 else (rng.randrange(h), rng.randrange(w))
            bh, bw = (h - top, w - left) if trial < 2 else (rng.randint(1, h - top), rng.randint(1, w - left))
            boxes.append([top, left, bh, bw])
        boxes = torch.tensor(boxes)
        cut = resized_crops(images, boxes, 24, fill=math.nan)
        whole = resized_crops(images, boxes, 24, fill=math.nan, cut=False)
        assert not torch.isnan(cut).any()
        torch.testing.assert_close(cut, whole, atol=0.01, rtol=0)
    cuts, local = crop_regions(
        images, torch.tensor([[5, 6, 10, 20], [0, 0, 64, 50], [16, 89, 1, 1]] + [[0, 0, 1, 1]] * 3)
    )
    assert [tuple(c.shape[1:]) for c in cuts[:3]] == [(12, 22), (64, 50), (2, 2)]
    assert local[:3, :2].tolist() == [[1, 1], [0, 0], [1, 1]]
    assert cuts[0].untyped_storage().data_ptr() == images[0].untyped_storage().data_ptr()  # a view, not a copy


def _solid_jpeg(path, value: int, mode: str = "RGB", fmt: str = "JPEG") -> None:
    im = Image.new("RGB", (40 + value % 7, 30 + value % 5), (value, value, value))
    if mode == "CMYK":
        im = im.convert("CMYK")
    im.save(path, format=fmt)


@pytest.mark.parametrize("device", DEVICES)
def test_index_alignment_and_no_file_dropped(tmp_path, device):
    """Files whose pixels encode their index: every index comes back once, with its own pixels and label.

    Among them a PNG under a .JPEG name and a CMYK JPEG, which take the CPU fallback instead of being dropped.
    """
    samples = []
    for i in range(26):
        path = tmp_path / f"{i:03d}.JPEG"
        fmt, mode = ("PNG", "RGB") if i == 5 else ("JPEG", "CMYK" if i == 9 else "RGB")
        _solid_jpeg(path, 8 * i + 20, mode=mode, fmt=fmt)
        samples.append((str(path), i % 4))
    order = list(range(26))
    random.Random(3).shuffle(order)
    for workers in (0, 2):
        loader = GpuDecodeLoader(
            samples, sampler=order, batch_size=8, img_size=16, mean=(0, 0, 0), std=(1 / 255,) * 3,
            device=torch.device(device), num_workers=workers, color_jitter=0.0,
        )  # fmt: skip
        seen = []
        for x, y, idx in loader:
            assert x.shape[1:] == (3, 16, 16)
            assert x.device.type == device
            for img, target, i in zip(x.cpu(), y.tolist(), idx.tolist(), strict=True):
                assert target == i % 4
                assert abs(img.mean().item() - (8 * i + 20)) < 3, (i, img.mean().item())
            seen += idx.tolist()
        assert seen == order
        assert loader.stats.get("cpu", 0) >= 1  # the PNG at least went through PIL


def test_chunked_reading_gives_the_batches_of_one_worker_per_batch(tmp_path):
    """Workers read chunks of a batch (4 files for a batch of 12 and 3 workers); the loader joins them into
    exactly the batches, indices and pixels that one worker per batch (``chunk=False``) gives, the last partial
    batch kept or dropped, and ``len`` counts them."""
    samples = []
    for i in range(26):
        _solid_jpeg(tmp_path / f"{i:03d}.JPEG", 8 * i + 20)
        samples.append((str(tmp_path / f"{i:03d}.JPEG"), i % 4))
    order = list(range(26))
    random.Random(5).shuffle(order)

    def batches(chunk: bool, drop_last: bool) -> tuple[list, list[list[int]], torch.Tensor, int]:
        loader = GpuDecodeLoader(
            samples, sampler=order, batch_size=12, img_size=16, mean=(0, 0, 0), std=(1 / 255,) * 3,
            device=torch.device("cpu"), num_workers=3, seed=1, chunk=chunk, drop_last=drop_last,
        )  # fmt: skip
        out = list(loader)
        chunks = len(list(loader.loader))  # the workers' tasks of one epoch
        return (
            [len(b[2]) for b in out],
            [b[2].tolist() for b in out],
            torch.cat([b[0] for b in out]),
            len(loader),
            chunks,
        )

    for drop_last in (False, True):
        sizes, indices, pixels, length, chunks = batches(True, drop_last)
        assert sizes == ([12, 12] if drop_last else [12, 12, 2]) and length == len(sizes) and chunks == 7
        assert sum(indices, []) == order[: sum(sizes)]
        whole = batches(False, drop_last)
        assert whole[4] == 3 and (sizes, indices, length) == (whole[0], whole[1], whole[3])
        assert torch.equal(pixels, whole[2])


def test_a_chunk_travels_as_one_tensor_and_reads_back_as_views():
    """A worker's chunk is one shared-memory tensor (each tensor handed over costs a segment of its own); its
    bytes, targets, indices, seeds (int64, beyond float precision too) and parameters read back unchanged."""
    items = [(torch.arange(k + 3, dtype=torch.uint8) * (k + 1), k % 3, 100 + k, 2**62 + k,
              torch.arange(len(PARAM_FIELDS), dtype=torch.float64) / (k + 1)) for k in range(5)]  # fmt: skip
    packed = encoded_collate(items)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    data, meta, params = unpack_encoded(packed)
    for k, (raw, target, index, seed, row) in enumerate(items):
        assert torch.equal(data[k], raw) and data[k].untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
        assert meta[k, 1:].tolist() == [target, index, seed] and torch.equal(params[k], row)
    assert [len(x) for x in unpack_encoded(encoded_collate([]))] == [0, 0, 0]


def test_undecodable_file_is_named(tmp_path):
    bad = tmp_path / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    data = [torch.frombuffer(bytearray(bad.read_bytes()), dtype=torch.uint8)]
    with pytest.raises(DataError, match="broken.JPEG.*remove or replace"):
        decode_batch(data, device=torch.device("cpu"), paths=[str(bad)])


def test_epoch_augmentation_is_a_function_of_seed_epoch_rank():
    files = _imagenet_files(6)

    class Epoch(list):
        epoch = 3

    def batches():
        loader = GpuDecodeLoader(
            [(f, 0) for f in files], sampler=Epoch(range(6)), batch_size=3, img_size=32, mean=(0.5,) * 3,
            std=(0.25,) * 3, device=torch.device("cpu"), num_workers=0,
        )  # fmt: skip
        return [x for x, _, _ in loader]

    a, b = batches(), batches()
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_trainer_refuses_gpu_decode_without_cuda(tmp_path, imagenet_tiny, capsys):
    from dap_pretrain.train import cli as train_cli

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train_cli(
            ["--data-dir", str(imagenet_tiny), "--model", "test_resnet", "--img-size", "64", "--aug", "imagenet",
             "--device", "cpu", "--gpu-decode", "--output", str(out), "--epochs", "2", "--dap-warmup", "1",
             "--no-plot"]
        )  # fmt: skip
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and "--gpu-decode" in lines[0] and "CUDA" in lines[0], err
    assert not out.exists()  # the refused command leaves no folder behind


@pytest.mark.parametrize("device", DEVICES)
def test_pad_methods_give_the_same_batch_and_pixels(device):
    """``pad="nested"`` (a few kernels per batch) and ``"copies"`` (one per image) build the same padded batch, so
    the loader's batches are the same either way; an unknown method is refused."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 20 + 3 * k, 41 - 2 * k), generator=g, dtype=torch.uint8) for k in range(7)]
    images = [im.to(device) for im in images]
    assert torch.equal(pad_batch(images, method="nested"), pad_batch(images))
    assert torch.equal(pad_batch(images, method="nested", dtype=torch.float32), pad_batch(images).float())
    assert torch.equal(pad_batch(images, dtype=torch.float32), pad_batch(images).float())  # converted while copied
    files = _imagenet_files(4)

    def pixels(pad: str) -> torch.Tensor:
        loader = GpuDecodeLoader(
            [(f, 0) for f in files], sampler=range(4), batch_size=4, img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
            device=torch.device(device), num_workers=0, pad=pad, pin_memory=True,
        )  # fmt: skip
        return torch.cat([x.cpu() for x, _, _ in loader])

    assert torch.equal(pixels("nested"), pixels("copies"))
    with pytest.raises(ValueError, match="pad method 'ragged'"):
        pad_batch(images, method="ragged")


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_batches_match_float32(device):
    """``dtype=float16/bfloat16`` (flip and jitter in float16, the AMP dtype out) gives the float32 batch to within
    the output dtype's rounding; crops stay float32. An unsupported dtype is refused."""
    files = _imagenet_files(24)

    def batch(dtype: torch.dtype) -> torch.Tensor:
        loader = GpuDecodeLoader(
            [(f, 0) for f in files], sampler=range(len(files)), batch_size=len(files), img_size=96, mean=(0, 0, 0),
            std=(1 / 255, 1 / 255, 1 / 255), device=torch.device(device), num_workers=0, channels_last=True,
            dtype=dtype,
        )  # fmt: skip
        (x, _, _), *_ = list(loader)
        assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
        return x.float().cpu()

    ref = batch(torch.float32)
    # in 0..255 units; measured on cpu-2 at 224 px: float16 mean 0.054, max 0.59; bfloat16 mean 0.16, max 1.02
    for dtype, mean_tol, max_tol in ((torch.float16, 0.1, 1.0), (torch.bfloat16, 0.3, 2.0)):
        diff = (batch(dtype) - ref).abs()
        assert diff.mean() < mean_tol and diff.max() < max_tol, (dtype, diff.mean(), diff.max())
    assert (ref - ref.roll(1, 0)).abs().mean() > 20  # other images differ by tens of levels: the test can fail
    with pytest.raises(ValueError, match="dtype torch.float64"):
        GpuDecodeLoader([], sampler=[], batch_size=1, img_size=8, mean=(0,) * 3, std=(1,) * 3,
                        device=torch.device(device), num_workers=0, dtype=torch.float64)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_fused_finish_gives_the_eager_batches(device, monkeypatch, caplog):
    """``fuse=True`` (flip, jitter and normalise as one ``torch.compile``d function, compiled once before the
    producer thread starts, for any batch size) gives the step-by-step batches to within float rounding, in float32
    and in the AMP dtype, with and without jitter and channels-last; if compiling fails, one warning and the
    unfused batches."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    files = _imagenet_files(9)

    def batches(**kw) -> tuple[torch.Tensor, GpuDecodeLoader]:
        channels_last = kw.pop("channels_last", True)
        loader = GpuDecodeLoader(
            [(f, 0) for f in files], sampler=range(len(files)), batch_size=8, img_size=48, mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225), device=torch.device(device), num_workers=0, channels_last=channels_last, **kw,
        )  # fmt: skip
        xs = [x for x, _, _ in loader]  # batches of 8 and 1: compiled once, and the batch of 1 not again
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert all(x.is_contiguous(memory_format=fmt) for x in xs)
        return torch.cat([x.float().cpu() for x in xs]), loader

    torch._dynamo.reset()
    counters.clear()
    ref, _ = batches()
    with caplog.at_level("WARNING"):
        fused, loader = batches(fuse=True)
    assert loader.fused is True, [r.getMessage() for r in caplog.records]  # compiled, not fallen back
    assert counters["frames"]["total"] == 1  # one compile, before the producer thread: it never compiles
    assert (ref - fused).abs().max() < 1e-3  # normalised units: about 1/4 of a grey level is 0.017
    half, _ = batches(fuse=True, dtype=torch.float16)
    assert (half - ref).abs().max() < 0.02  # float16 out: its rounding at values up to about 2.6
    plain, _ = batches(fuse=True, color_jitter=0.0, channels_last=False)
    assert (plain - batches(color_jitter=0.0, channels_last=False)[0]).abs().max() < 1e-3
    assert (ref - ref.roll(1, 0)).abs().mean() > 0.3  # other images differ by far more: the test can fail
    assert (ref - plain).abs().mean() > 0.01  # and the jitter changes the batch: its absence would show

    def broken(fn):
        def call(*args, **kwargs):
            raise RuntimeError("no compiler here\nsecond line")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    caplog.clear()
    with caplog.at_level("WARNING"):
        fallback, loader = batches(fuse=True)
    assert loader.fused is False and torch.equal(fallback, ref)  # the unfused path, exactly
    warnings = [r.getMessage() for r in caplog.records if "could not compile" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0] and "\n" not in warnings[0], warnings


@pytest.mark.parametrize("fuse", [False, True])
def test_trainer_trains_dap_through_the_gpu_pipeline(tmp_path, imagenet_tiny, monkeypatch, fuse):
    """The trainer's ``--gpu-decode`` path end to end (DaP drops, loss record, evaluation), on CPU tensors: only the
    CUDA refusal is lifted. With ``fuse`` (the GPU A/B's ``trainer_gpu_decode_fused``) the run uses the compiled
    finish."""
    import functools

    from dap_pretrain import runner
    from dap_pretrain.train import main as train_main

    monkeypatch.setattr(runner, "_gpu_decode_device", lambda device: None)
    if fuse:
        monkeypatch.setattr(runner, "GpuDecodeLoader", functools.partial(runner.GpuDecodeLoader, fuse=True))
    out = tmp_path / "run"
    summary = train_main(
        ["--data-dir", str(imagenet_tiny), "--model", "test_resnet", "--img-size", "48", "--aug", "imagenet",
         "--device", "cpu", "--gpu-decode", "--output", str(out), "--epochs", "3", "--dap-warmup", "1",
         "--dap-interval", "1", "--dap-keep", "0.5", "-b", "4", "-j", "0", "--no-plot", "--channels-last"]
    )  # fmt: skip
    with (out / "summary.csv").open() as f:
        rows = [{k: float(r[k]) for k in ("samples_trained", "train_loss")} for r in csv.DictReader(f)]
    assert [r["samples_trained"] for r in rows] == [16, 16, 8]  # warm-up, then DaP keeps half: through the pipeline
    assert summary["top1"] is not None and all(math.isfinite(r["train_loss"]) for r in rows)
    log = (out / "log.txt").read_text()
    assert "GPU JPEG pipeline: 16 files" in log and ("fused by torch.compile" in log) == fuse
