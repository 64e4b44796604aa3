"""Mixup/CutMix: timm's mixing, and each sample's own loss for DaP (``dap_pretrain.mixing``)."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import mixup as timm_mixup

from dap_pretrain.config import run_config
from dap_pretrain.engine import train_one_epoch
from dap_pretrain.errors import UsageError
from dap_pretrain.mixing import Mixer, MixParams, mix_images, mixed_losses
from dap_pretrain.train import parse_args


def _timm_soft_losses(logits, soft_target):
    """Per image, what timm's SoftTargetCrossEntropy averages."""
    return torch.sum(-soft_target * logits.log_softmax(dim=-1), dim=-1)


def _batch(n=6, classes=5, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("cutmix", [False, True])
def test_a_mixed_batch_and_its_image_losses_are_timms(cutmix):
    """Same draw as timm's Mixup in batch mode: the same pixels, and the same per-image soft-target losses."""
    images, targets = _batch()
    timm = timm_mixup.Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=5)
    box = (2, 6, 1, 5)  # rows 2-5, columns 1-4 of 8 x 8: 16 of 64 pixels
    with (
        mock.patch.object(timm_mixup.Mixup, "_params_per_batch", return_value=(0.6, cutmix)),
        mock.patch.object(timm_mixup, "rand_bbox", return_value=box),
    ):
        timm_images, soft = timm(images.clone(), targets)
    lam = 1 - 16 / 64 if cutmix else 0.6
    boxes = np.tile(box if cutmix else (0, 0, 0, 0), (6, 1))
    ours = mix_images(images, MixParams(lam=np.full(6, lam), boxes=boxes))
    torch.testing.assert_close(ours, timm_images)
    logits = torch.randn(6, 5)
    per_image = mixed_losses(logits, targets, torch.full((6,), lam), smoothing=0.1).images
    torch.testing.assert_close(per_image, _timm_soft_losses(logits, soft))


def test_per_element_mixing_is_timms():
    images, targets = _batch(n=4)
    lam = np.array([0.9, 1.0, 0.3, 0.55], dtype=np.float32)
    timm = timm_mixup.Mixup(mixup_alpha=1.0, mode="elem", label_smoothing=0.0, num_classes=5)
    with mock.patch.object(timm_mixup.Mixup, "_params_per_elem", return_value=(lam.copy(), np.zeros(4, bool))):
        timm_images, soft = timm(images.clone(), targets)
    ours = mix_images(images, MixParams(lam=lam.astype(np.float64), boxes=np.zeros((4, 4), np.int64)))
    torch.testing.assert_close(ours, timm_images)
    logits = torch.randn(4, 5)
    per_image = mixed_losses(logits, targets, torch.as_tensor(lam), smoothing=0.0).images
    torch.testing.assert_close(per_image, _timm_soft_losses(logits, soft))


def test_each_sample_is_charged_for_its_own_label_and_the_batch_loss_is_only_split():
    """Sample 0's label is the one the model gets wrong. Blended half and half, image 0 and image 3 (its partner)
    lose the same; ranked by image, sample 3 would look as hard as sample 0. Ranked by its own label, only 0 is."""
    targets = torch.tensor([0, 1, 2, 3])
    logits = torch.full((4, 5), 0.0)
    logits[:, 1:] = 4.0  # every image: classes 1-4 likely, class 0 (sample 0's label) not
    lam = torch.full((4,), 0.5)
    per_image, own, _ = mixed_losses(logits, targets, lam, smoothing=0.0)
    assert per_image[0] == pytest.approx(float(per_image[3]))
    assert own[0] > 3 * own[3]
    assert float(own.sum()) == pytest.approx(float(per_image.sum()))
    # by hand: own_0 = lam_0 * L_0(y_0) + (1 - lam_3) * L_3(y_0)
    ce = lambda i, c: float(F.cross_entropy(logits[i : i + 1], torch.tensor([c])))  # noqa: E731
    assert float(own[0]) == pytest.approx(0.5 * ce(0, 0) + 0.5 * ce(3, 0))


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_equally_hard_samples_get_equal_own_losses_whatever_the_draws(mode):
    """A model that knows nothing: every label costs log 5 in every image. The recorded losses must not depend on
    how much of each sample the draws put into the images (in elem mode its two weights add up to 0-2)."""
    logits, targets = torch.zeros(8, 5), torch.arange(8) % 5
    for step in range(5):
        p = Mixer(mixup_alpha=1.0, cutmix_alpha=1.0, mode=mode, seed=0).draw(8, 16, 16, epoch=0, step=step)
        own = mixed_losses(logits, targets, torch.as_tensor(p.lam, dtype=torch.float32)).own
        torch.testing.assert_close(own, torch.full((8,), math.log(5)))


def test_loss_weights_scale_each_label_by_its_own_samples_weight():
    """InfoBatch's weights: sample j's label is up-weighted in its own image and in its partner's, the partner's
    label in image j by the partner's weight."""
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    lam, w = torch.tensor([0.7, 0.4, 0.4, 0.7]), torch.tensor([2.0, 1.0, 1.0, 1.0])
    out = mixed_losses(logits, targets, lam, weights=w)
    ce = lambda i, c: float(F.cross_entropy(logits[i : i + 1], torch.tensor([c])))  # noqa: E731
    assert float(out.trained[0]) == pytest.approx(0.7 * 2.0 * ce(0, 0) + 0.3 * 1.0 * ce(0, 0))  # partner 3: label 0
    assert float(out.trained[3]) == pytest.approx(0.7 * 1.0 * ce(3, 0) + 0.3 * 2.0 * ce(3, 0))
    torch.testing.assert_close(mixed_losses(logits, targets, lam, weights=torch.ones(4)).trained, out.images)


def test_pair_mode_and_per_element_cutmix_are_timms():
    """Pair mode (one draw per pair, both images of it mixed) and CutMix per element, against timm's own code."""
    images, targets = _batch(n=6, size=8)
    lam3, cut3 = np.array([0.6, 0.8, 1.0], np.float32), np.array([True, False, False])
    box = (1, 5, 2, 6)
    timm = timm_mixup.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="pair", label_smoothing=0.0, num_classes=5)
    with (
        mock.patch.object(timm_mixup.Mixup, "_params_per_elem", return_value=(lam3.copy(), cut3)),
        mock.patch.object(timm_mixup, "rand_bbox", return_value=box),
    ):
        timm_images, _ = timm(images.clone(), targets)
    cut_lam = 1 - 16 / 64
    lam = np.array([cut_lam, 0.8, 1.0, 1.0, 0.8, cut_lam])
    boxes = np.array([box, (0,) * 4, (0,) * 4, (0,) * 4, (0,) * 4, box])
    torch.testing.assert_close(mix_images(images, MixParams(lam=lam, boxes=boxes)), timm_images)
    lam6, cut6 = np.array([0.5, 1.0, 0.3, 1.0, 0.9, 0.2], np.float32), np.array([True, False, True, False, False, True])
    timm = timm_mixup.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", label_smoothing=0.0, num_classes=5)
    with (
        mock.patch.object(timm_mixup.Mixup, "_params_per_elem", return_value=(lam6.copy(), cut6)),
        mock.patch.object(timm_mixup, "rand_bbox", return_value=box),
    ):
        timm_images, soft = timm(images.clone(), targets)
    lam = np.where(cut6, cut_lam, lam6).astype(np.float64)
    boxes = np.array([box if c else (0,) * 4 for c in cut6])
    torch.testing.assert_close(mix_images(images, MixParams(lam=lam, boxes=boxes)), timm_images)
    logits = torch.randn(6, 5)
    per_image = mixed_losses(logits, targets, torch.as_tensor(lam, dtype=torch.float32)).images
    torch.testing.assert_close(per_image, _timm_soft_losses(logits, soft))


def test_a_batch_the_draws_leave_unmixed_is_passed_through():
    images, _ = _batch(n=4)
    mixed, lam = Mixer(mixup_alpha=1.0, prob=0.0, seed=0)(images, epoch=0, step=0)
    assert mixed is images and torch.equal(lam, torch.ones(4))


def test_unmixed_losses_are_cross_entropy_with_smoothing():
    logits, targets = torch.randn(5, 7), torch.tensor([0, 6, 3, 3, 1])
    per_image, own, _ = mixed_losses(logits, targets, torch.ones(5), smoothing=0.2)
    expected = F.cross_entropy(logits, targets, reduction="none", label_smoothing=0.2)
    torch.testing.assert_close(per_image, expected)
    torch.testing.assert_close(own, expected)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_an_odd_batch_leaves_its_middle_image_unmixed(mode):
    """A DaP subset's last batch can be odd; timm asserts an even one. The middle image is its own partner."""
    images, targets = _batch(n=5)
    mixer = Mixer(mixup_alpha=1.0, cutmix_alpha=1.0, mode=mode, seed=3)
    mixed, lam = mixer(images, epoch=0, step=0)
    assert lam[2] == 1.0 and torch.equal(mixed[2], images[2])
    per_image, own, _ = mixed_losses(torch.randn(5, 5), targets, lam)
    if mode != "elem":  # a pair shares one draw: the own losses split the batch's loss
        assert float(own.sum()) == pytest.approx(float(per_image.sum()), rel=1e-6)


def test_pair_mode_gives_partners_one_draw():
    p = Mixer(mixup_alpha=0.8, cutmix_alpha=1.0, mode="pair", seed=1).draw(8, 16, 16, epoch=2, step=5)
    assert np.array_equal(p.lam, p.lam[::-1]) and np.array_equal(p.boxes, p.boxes[::-1])
    assert len(set(p.lam.round(6))) > 1  # four pairs, four draws


def test_draws_depend_only_on_seed_rank_epoch_and_step():
    """So a resumed run mixes its batches as the uninterrupted one did, whatever numpy's global state."""
    kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem")
    a = Mixer(**kw, seed=7).draw(16, 32, 32, epoch=3, step=9)
    np.random.seed(123)
    b = Mixer(**kw, seed=7).draw(16, 32, 32, epoch=3, step=9)
    assert np.array_equal(a.lam, b.lam) and np.array_equal(a.boxes, b.boxes)
    for other in (dict(seed=8), dict(rank=1)):
        c = Mixer(**kw, **{"seed": 7, **other}).draw(16, 32, 32, epoch=3, step=9)
        assert not np.array_equal(a.lam, c.lam)
    assert not np.array_equal(a.lam, Mixer(**kw, seed=7).draw(16, 32, 32, epoch=3, step=10).lam)


def test_draws_follow_timms_distributions():
    """Mixup's lam ~ Beta(alpha, alpha) mixed with probability prob; CutMix's lam is its box's complement."""
    alpha, n = 0.8, 20_000
    lam = Mixer(mixup_alpha=alpha, mode="elem", prob=0.5, seed=0).draw(n, 32, 32, epoch=0, step=0).lam
    mixed = lam[lam < 1]
    assert len(mixed) / n == pytest.approx(0.5, abs=0.02)
    assert mixed.mean() == pytest.approx(0.5, abs=0.01)
    assert mixed.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)  # Beta(a, a)'s variance
    p = Mixer(cutmix_alpha=1.0, mode="elem", seed=0).draw(500, 24, 32, epoch=0, step=0)
    area = (p.boxes[:, 1] - p.boxes[:, 0]) * (p.boxes[:, 3] - p.boxes[:, 2])
    np.testing.assert_allclose(p.lam, 1 - area / (24 * 32))
    m = Mixer(cutmix_minmax=(0.2, 0.5), mode="elem", seed=0).draw(500, 40, 40, epoch=0, step=0)
    sides = np.stack([m.boxes[:, 1] - m.boxes[:, 0], m.boxes[:, 3] - m.boxes[:, 2]])
    assert sides.min() >= 8 and sides.max() < 20
    either = Mixer(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.25, mode="elem", seed=0)
    both = either.draw(4000, 32, 32, epoch=0, step=0)
    pasted = both.boxes[:, 1] > both.boxes[:, 0]
    assert pasted.mean() == pytest.approx(0.25, abs=0.03)


def test_mixing_keeps_dtype_and_channels_last_and_leaves_its_input_alone():
    images, _ = _batch(n=6)
    images = images.to(torch.float16).contiguous(memory_format=torch.channels_last)
    before = images.clone()
    mixed, lam = Mixer(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", seed=0)(images, epoch=0, step=0)
    assert mixed.dtype == torch.float16 and mixed.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, before) and lam.dtype == torch.float32 and not torch.equal(mixed, images)


def test_the_engine_trains_on_image_losses_and_records_own_losses():
    """One step through ``train_one_epoch``: the sampler gets the own-label split; the epoch's loss is the
    images' (their sums agree)."""
    from engine_stubs import FixedLR

    torch.manual_seed(0)
    images, targets = _batch(n=6, classes=3, size=4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    recorded = {}

    class Sampler:
        def record(self, indices, losses):
            recorded.update(zip(indices.tolist(), losses.tolist(), strict=True))

    mixer = Mixer(mixup_alpha=1.0, seed=0)
    mixed, lam = mixer(images, epoch=0, step=0)
    with torch.no_grad():
        per_image, own, _ = mixed_losses(model(mixed), targets, lam)
    stats = train_one_epoch(
        model, [(images, targets, torch.arange(10, 16))], torch.optim.SGD(model.parameters(), lr=0.0), epoch=0,
        sampler=Sampler(), lr_scheduler=FixedLR(), device=torch.device("cpu"), mixer=mixer, show_progress=False,
    )  # fmt: skip
    assert list(recorded) == list(range(10, 16))
    torch.testing.assert_close(torch.tensor([recorded[i] for i in range(10, 16)]), own)
    assert not torch.allclose(own, per_image)
    assert stats.loss == pytest.approx(float(per_image.mean()), rel=1e-5)
    # past --mixup-off-epoch the batch trains unmixed: the recorded losses are plain cross-entropy
    late = Mixer(mixup_alpha=1.0, seed=0, off_epoch=1)
    assert late.active(0) and not late.active(1) and "epochs 1-1 only" in late.describe()
    train_one_epoch(
        model, [(images, targets, torch.arange(10, 16))], torch.optim.SGD(model.parameters(), lr=0.0), epoch=1,
        sampler=Sampler(), lr_scheduler=FixedLR(), device=torch.device("cpu"), mixer=late, show_progress=False,
    )  # fmt: skip
    with torch.no_grad():
        plain = F.cross_entropy(model(images), targets, reduction="none")
    torch.testing.assert_close(torch.tensor([recorded[i] for i in range(10, 16)]), plain)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--mixup", "-0.2"], "--mixup=-0.2 is invalid"),
        (["--cutmix", "1", "--mixup-prob", "1.5"], "--mixup-prob=1.5 is invalid"),
        (["--cutmix-minmax", "0.8", "0.2"], "--cutmix-minmax 0.8 0.2 is invalid"),
        (["--mixup", "0.2", "--mixup-off-epoch", "-1"], "--mixup-off-epoch=-1 is invalid"),
        (["--mixup", "0.2", "--cuda-graph"], "--cuda-graph replays an unmixed step"),
        (["--mixup-mode", "elem"], "--mixup-mode set how batches are mixed; add --mixup or --cutmix"),
    ],
)
def test_bad_mixing_flags_are_refused_in_one_line(flags, words):
    with pytest.raises(UsageError, match=words.replace("-", r"\-").replace(".", r"\.")):
        run_config(parse_args(["--output", "o", *flags]))


def test_a_config_files_mixing_keys_are_checked_like_flags(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mixup: 0.8\ncutmix_minmax: [0.2, 0.5, 0.9]\n")
    with pytest.raises(UsageError, match=r"cutmix_minmax: \[0\.2, 0\.5, 0\.9\] is invalid: write a list of 2"):
        run_config(parse_args(["--config", str(bad)]))
    bad.write_text("mixup: 0.8\ncutmix_minmax: [0.5, 0.2]\n")  # the right shape, a wrong range: run_config's check
    with pytest.raises(UsageError, match=r"--cutmix-minmax 0\.5 0\.2 is invalid"):
        run_config(parse_args(["--config", str(bad)]))
    idle = tmp_path / "idle.yaml"
    idle.write_text("mixup_mode: elem\n")
    with pytest.raises(UsageError, match="--mixup-mode set how batches are mixed"):
        run_config(parse_args(["--config", str(idle)]))


def test_mixing_flags_are_accepted_with_dap_and_without():
    for select in ("hard", "none", "infobatch", "random"):
        cfg = run_config(parse_args(["--mixup", "0.8", "--cutmix", "1.0", "--dap-select", select]))
        assert cfg.mixup == 0.8 and cfg.cutmix == 1.0


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on a GPU machine the same test runs on it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_mixing_and_its_losses_never_wait_for_the_device(device, mode):
    """On CUDA, torch raises on any host-device sync inside (set_sync_debug_mode); on the CPU the same code runs."""
    images, targets = (t.to(device) for t in _batch(n=8, size=16))
    mixer = Mixer(mixup_alpha=1.0, cutmix_alpha=1.0, mode=mode, seed=0)
    logits = torch.randn(8, 5, device=device)
    weights = torch.rand(8, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(4):
            mixed, lam = mixer(images, epoch=0, step=step)
            out = mixed_losses(logits, targets, lam, smoothing=0.1, weights=weights)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert mixed.device == images.device and out.own.device == images.device
    reference = mix_images(images.cpu(), mixer.draw(8, 16, 16, epoch=0, step=3))
    torch.testing.assert_close(mixed.cpu(), reference)
