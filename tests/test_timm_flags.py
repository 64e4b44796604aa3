"""timm's train.py flags for regularisation, augmentation and the optimizer reach timm's own builders; a flag the
run cannot honour is one line (exit 2); RandAugment's draws are seeded per sample like the rest of the transform."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from engine_stubs import FixedLR, RecordingSampler
from timm.data.auto_augment import RandAugment
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.layers import DropPath
from torchvision import transforms as T

from dap_pretrain import runner
from dap_pretrain.config import run_config
from dap_pretrain.data.dataset import IndexedDataset, create_dataset
from dap_pretrain.data.loader import Uint8RandomErasing, describe_transform, trainer_transform
from dap_pretrain.errors import UsageError
from dap_pretrain.train import cli, parse_args

AUG = ["--aa", "rand-m9-mstd0.5-inc1", "--scale", "0.25", "1", "--ratio", "0.8", "1.25", "--hflip", "0.3",
       "--vflip", "0.1", "--train-interpolation", "bicubic", "--reprob", "0.25", "--remode", "rand",
       "--recount", "2"]  # fmt: skip
RECIPE = ["--drop", "0.2", "--drop-path", "0.1", "--opt", "adamw", "--opt-betas", "0.9", "0.99", "--opt-eps", "1e-6",
          "--layer-decay", "0.8", "--lr", "1e-3"]  # fmt: skip


def _cfg(data, *flags):
    base = ["--model", "resnet18", "--data-dir", str(data), "--aug", "imagenet", "--img-size", "64", "--epochs", "2",
            "--dap-warmup", "1"]  # fmt: skip
    return run_config(parse_args([*base, "--output", "unused", *flags]))


def _steps(transform) -> dict:
    return {type(t): t for t in transform.transforms}


def test_flags_reach_timms_transform_model_and_optimizer(imagenet_tiny):
    cfg = _cfg(imagenet_tiny, *AUG, *RECIPE)
    steps = _steps(runner._build_data(cfg, {}).train.dataset.transform)
    crop = steps[RandomResizedCropAndInterpolation]
    assert crop.scale == (0.25, 1.0) and crop.ratio == (0.8, 1.25) and crop.interpolation == T.InterpolationMode.BICUBIC
    assert steps[T.RandomHorizontalFlip].p == 0.3 and steps[T.RandomVerticalFlip].p == 0.1
    assert RandAugment in steps
    erasing = steps[Uint8RandomErasing].erase
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "rand", 2)
    line = describe_transform(runner._build_data(cfg, {}).train.dataset.transform)  # what the run log shows
    assert "scale=(0.25, 1.0)" in line and "RandAugment(layers=2, magnitude=9)" in line and "\n" not in line
    assert line.endswith("Uint8RandomErasing(p=0.25, mode=rand, count=2)")

    model = runner._build_model(cfg, 16, torch.device("cpu"))
    assert model.drop_rate == 0.2
    assert max(m.drop_prob for m in model.modules() if isinstance(m, DropPath)) == pytest.approx(0.1)
    opt = runner._build_optimizer(cfg, model)
    assert type(opt).__name__ == "AdamW" and opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["eps"] == 1e-6
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[0] < 0.8**2  # layer decay: deeper layers learn faster

    # without the flags: timm's defaults, bilinear, no RandAugment, no DropPath
    plain = _cfg(imagenet_tiny)
    steps = _steps(runner._build_data(plain, {}).train.dataset.transform)
    crop = steps[RandomResizedCropAndInterpolation]
    assert crop.scale == (0.08, 1.0) and crop.interpolation == T.InterpolationMode.BILINEAR
    assert not {RandAugment, T.RandomVerticalFlip, Uint8RandomErasing} & set(steps)
    assert not any(isinstance(m, DropPath) for m in runner._build_model(plain, 16, torch.device("cpu")).modules())


def test_randaugment_draws_depend_on_the_sample_seed_alone(imagenet_tiny):
    """timm's RandAugment picks its ops with numpy's global generator; a seeded item reseeds it too."""
    ds = IndexedDataset(create_dataset(name="", root=str(imagenet_tiny), split="train", is_training=True))
    ds.transform = trainer_transform(img_size=64, aug="imagenet", is_training=True, auto_augment="rand-m5-n3-mstd0",
                                     re_prob=0.5)  # fmt: skip
    first = []
    for np_seed in (1, 2):  # whatever the generators held before
        np.random.seed(np_seed)
        torch.manual_seed(np_seed)
        first.append(ds[(3, 12_345)][0])
    assert torch.equal(first[0], first[1])
    assert any(not torch.equal(first[0], ds[(3, 12_345 + k)][0]) for k in range(1, 4))


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--aa", "rand-m9-mstd0.5", "--hflip", "0.2"], ["--hflip --aa", "CIFAR", "--aug imagenet"]),
        (["--drop", "0.1", "--drop-path", "0.1"], ["cifar_resnet20 does not take --drop-path (", "drop the flag"]),
    ],
)
def test_a_flag_the_run_cannot_honour_is_one_line(tmp_path, cifar_tiny, capsys, flags, words):
    out = tmp_path / "o"
    argv = ["--data-dir", str(cifar_tiny), "--epochs", "2", "--dap-warmup", "1", "--output", str(out), *flags]
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(w in err for w in words), err
    assert not out.exists() or not any(p.name != ".lock" for p in out.iterdir())


def test_gpu_decode_takes_the_crop_flip_and_jitter_flags_and_refuses_the_rest(imagenet_tiny):
    cfg = _cfg(imagenet_tiny, "--scale", "0.35", "1", "--hflip", "0.3", "--color-jitter", "0.2",
               "--train-interpolation", "bilinear")  # fmt: skip
    assert runner._gpu_decode_augment(cfg) == {"scale": (0.35, 1.0), "hflip": 0.3, "color_jitter": 0.2}
    with pytest.raises(UsageError, match="not --vflip --aa; drop them or drop --gpu-decode"):
        runner._gpu_decode_augment(_cfg(imagenet_tiny, "--aa", "rand-m9", "--vflip", "0.5"))
    with pytest.raises(UsageError, match="not --reprob;"):
        runner._gpu_decode_augment(_cfg(imagenet_tiny, "--reprob", "0.25"))


@pytest.mark.parametrize(("mode", "prob"), [("const", 1.0), ("rand", 1.0), ("pixel", 1.0), ("pixel", 0.5)])
def test_uint8_erasing_erases_timms_regions_with_timms_fill(mode, prob):
    """Same seed, same draws: the region and fill of timm's RandomErasing on the normalised image, in pixels; an
    image left alone consumes the same draw as in timm, so the generator stays in step."""
    from timm.data.random_erasing import RandomErasing

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shift, scale = torch.tensor(mean).view(3, 1, 1) * 255, torch.tensor(std).view(3, 1, 1) * 255
    erased = 0
    for seed in range(8):
        random.seed(seed), torch.manual_seed(seed)
        ours = Uint8RandomErasing(prob, mode=mode, count=2, mean=mean, std=std)(img.clone())
        next_ours = random.random(), torch.rand(())
        random.seed(seed), torch.manual_seed(seed)
        timm_erased = RandomErasing(prob, mode=mode, max_count=2, device="cpu")((img.float() - shift) / scale)
        expected = (timm_erased * scale + shift).round().clamp(0, 255).to(torch.uint8)
        assert torch.equal(ours, expected) and next_ours == (random.random(), torch.rand(()))
        changed = ours != img
        assert torch.equal(ours[~changed], img[~changed])  # untouched pixels come back exactly
        erased += bool(changed.any())
    assert erased == 8 if prob == 1.0 else 0 < erased < 8


def test_randaugment_and_erasing_do_not_depend_on_the_worker_count(imagenet_tiny):
    from dap_pretrain.data.loader import create_loader

    ds = IndexedDataset(create_dataset(name="", root=str(imagenet_tiny), split="train", is_training=True))
    ds.transform = trainer_transform(img_size=48, aug="imagenet", is_training=True, auto_augment="rand-m9-mstd0.5",
                                     re_prob=0.5)  # fmt: skip
    batches = []
    for workers in (0, 2):
        loader = create_loader(ds, batch_size=8, sampler=list(range(16)), mean=(0.5,) * 3, std=(0.25,) * 3,
                               device="cpu", num_workers=workers, seed=7)  # fmt: skip
        batches.append(list(loader))
    for (x0, y0, i0), (x2, y2, i2) in zip(*batches, strict=True):
        assert torch.equal(i0, i2) and torch.equal(y0, y2) and torch.equal(x0, x2)


def _epoch(sizes: list[int], accum: int) -> tuple[list[torch.Tensor], list[int]]:
    """One epoch of a BatchNorm-free model over 24 fixed samples cut into batches of ``sizes``."""
    from dap_pretrain.engine import train_one_epoch

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(sum(sizes), 3, 2, 2, generator=gen), torch.randint(0, 5, (sum(sizes),), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    loader = [(x[s : s + n], y[s : s + n], torch.arange(s, s + n)) for s, n in zip(starts, sizes, strict=True)]
    losses = RecordingSampler()
    train_one_epoch(model, loader, opt, epoch=0, sampler=losses, lr_scheduler=FixedLR(), device=torch.device("cpu"),
                    grad_accum_steps=accum, show_progress=False)  # fmt: skip
    return [p.detach().clone() for p in model.parameters()], losses.indices


@pytest.mark.parametrize(
    ("micro", "accum", "whole"),
    [([4] * 6, 2, [8, 8, 8]), ([4] * 6, 3, [12, 12]), ([4] * 5, 2, [8, 8, 4]), ([8, 8, 8], 1, [8, 8, 8])],
)
def test_grad_accum_steps_update_as_the_joined_batches_would(micro, accum, whole):
    """``--grad-accum-steps N`` with -b B trains as -b N*B would without BatchNorm, the epoch's short last group
    included; every micro-batch's losses are recorded."""
    params, recorded = _epoch(micro, accum)
    expected, _ = _epoch(whole, 1)
    assert recorded == list(range(sum(micro)))
    for a, b in zip(params, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if accum > 1:  # and it is not the plain per-batch update
        plain, _ = _epoch(micro, 1)
        assert not all(torch.allclose(a, b) for a, b in zip(params, plain, strict=True))


def test_grad_accum_steps_is_refused_by_the_cuda_graph_and_below_one(tmp_path, cifar_tiny, capsys):
    from dap_pretrain.cuda_graph import GraphUnsupportedError, check_graphable

    model = torch.nn.Linear(2, 2)
    with pytest.raises(GraphUnsupportedError, match="--grad-accum-steps"):
        check_graphable(device=torch.device("cuda"), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        amp_dtype=torch.bfloat16, scaler=None, model_ema=None, clip_grad=None, world=1,
                        grad_accum_steps=2)  # fmt: skip
    with pytest.raises(UsageError, match="--grad-accum-steps=0 is invalid"):
        _cfg(cifar_tiny, "--grad-accum-steps", "0")


def test_timms_schedule_names_multistep_and_decay_epochs(cifar_tiny):
    from dap_pretrain.config import default_reuse

    multi = _cfg(cifar_tiny, "--sched", "multistep", "--decay-milestones", "1")
    assert multi.sched == "step" and multi.decay_milestones == [1]
    every_30 = ["--epochs", "100", "--decay-epochs", "30", "--output", "o"]
    every = run_config(parse_args(every_30))
    assert every.decay_milestones == [30, 60, 90] and default_reuse(every) == (30, 60, 90)  # DaP's R follows the LR
    scaled = run_config(parse_args([*every_30, "--epochs-scale", "0.5"]))
    assert scaled.epochs == 50 and scaled.decay_milestones == [15, 30, 45]
    with pytest.raises(UsageError, match="--decay-epochs=0 is invalid"):
        _cfg(cifar_tiny, "--decay-epochs", "0")


def test_lr_is_scaled_from_the_base_batch_to_the_global_batch():
    from dap_pretrain.config import scaled_lr

    def lr(*flags, world=8):
        cfg, note = scaled_lr(run_config(parse_args(["-b", "32", "--output", "o", *flags])), world=world)
        assert (note is None) == (not any(f.startswith("--lr-base") for f in flags))
        assert cfg.lr_base_size is None and cfg.lr_base is None  # args.yaml reproduces the LR, not the scaling
        return cfg.lr

    assert lr() == 0.1 and lr(world=1) == 0.1  # no base: --lr as given
    assert lr("--lr-base-size", "256") == pytest.approx(0.1)  # 32 x 8 = 256
    assert lr("--lr-base-size", "256", "--grad-accum-steps", "2") == pytest.approx(0.2)
    assert lr("--lr-base-size", "256", world=1) == pytest.approx(0.1 / 8)
    assert lr("--lr-base", "0.4") == pytest.approx(0.4)  # timm's --lr-base, default size 256
    with pytest.raises(UsageError, match="give one"):  # both given: --lr was silently replaced by --lr-base's
        lr("--lr-base", "0.4", "--lr", "9")
    assert lr("--lr-base", "0.4", "--opt", "adamw", world=32) == pytest.approx(0.4 * 2)  # sqrt(1024 / 256)
    assert lr("--lr-base", "0.4", "--opt", "adamw", "--lr-base-scale", "linear", world=32) == pytest.approx(1.6)
    with pytest.raises(UsageError, match="--lr-base-size=0 is invalid"):
        lr("--lr-base-size", "0")


def test_an_unknown_flag_is_one_line_that_names_a_close_known_one(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--drop_path", "0.1", "--dap-kep", "0.5", "--split-bn"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: unrecognized arguments: --drop_path 0.1 --dap-kep 0.5 --split-bn; did you mean "
                   "--drop-path for --drop_path, --dap-keep for --dap-kep? (see --help)")  # fmt: skip


def test_torchcompile_trains_the_same_weights_and_keeps_plain_checkpoints(tmp_path, cifar_tiny, capsys):
    """``--torchcompile eager`` (dynamo's capture without a code generator, fast on a CPU) trains bit for bit like
    the plain run; the checkpoint holds the plain module's keys, so resume and export are unchanged."""
    from dap_pretrain.train import main as train_main

    flags = ["--data-dir", str(cifar_tiny), "--epochs", "2", "--dap-warmup", "1", "--dap-interval", "1",
             "--dap-keep", "0.5", "-b", "32", "--workers", "1", "--no-plot"]  # fmt: skip
    try:
        runs = [train_main([*flags, "--output", str(tmp_path / name), *extra])
                for name, extra in (("plain", []), ("compiled", ["--torchcompile", "eager"]))]  # fmt: skip
    finally:
        torch._dynamo.reset()
    assert runs[0]["top1"] == runs[1]["top1"]
    plain, compiled = (torch.load(tmp_path / n / "last.pth.tar", weights_only=False) for n in ("plain", "compiled"))
    assert list(plain["state_dict"]) == list(compiled["state_dict"])  # no "_orig_mod." prefix
    for key, value in plain["state_dict"].items():
        assert torch.equal(value, compiled["state_dict"][key]), key
    for extra, words in ((["--torchcompile", "nope"], "is not a torch.compile backend"),
                         (["--torchcompile", "--cuda-graph"], "choose one")):  # fmt: skip
        with pytest.raises(SystemExit):
            cli([*flags, "--output", str(tmp_path / "refused"), *extra])
        assert words in capsys.readouterr().err
    assert not (tmp_path / "refused" / "args.yaml").exists()


def test_evaluation_transform_and_normalisation_flags(tmp_path, imagenet_tiny, cifar_tiny, capsys):
    cfg = _cfg(imagenet_tiny, "--crop-pct", "0.95", "--interpolation", "bicubic", "--mean", "0.5", "0.4", "0.3",
               "--std", "0.25", "0.2", "0.15", "--reprob", "1")  # fmt: skip
    data = runner._build_data(cfg, {})
    steps = _steps(data.val.dataset.transform)
    assert steps[T.Resize].size == 67 and steps[T.Resize].interpolation == T.InterpolationMode.BICUBIC  # 64 / 0.95
    assert (data.mean, data.std) == ((0.5, 0.4, 0.3), (0.25, 0.2, 0.15))
    erasing = _steps(data.train.dataset.transform)[Uint8RandomErasing]
    assert torch.allclose(erasing.shift.flatten(), torch.tensor([127.5, 102.0, 76.5]))  # erases in the same units
    default = _steps(runner._build_data(_cfg(imagenet_tiny), {"mean": (0.1, 0.2, 0.3)}).val.dataset.transform)
    assert steps.keys() == default.keys() and default[T.Resize].size == 73  # timm's 0.875, bilinear
    assert default[T.Resize].interpolation == T.InterpolationMode.BILINEAR
    assert runner._build_data(_cfg(imagenet_tiny), {"mean": (0.1, 0.2, 0.3)}).mean == (0.1, 0.2, 0.3)  # the model's
    with pytest.raises(SystemExit):
        cli(["--data-dir", str(cifar_tiny), "--epochs", "2", "--dap-warmup", "1", "--crop-pct", "0.9",
             "--output", str(tmp_path / "o")])  # fmt: skip
    assert "error: --crop-pct set timm's ImageNet transforms, but this run uses the CIFAR" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "dtype"), [((), torch.float32), (("--amp",), torch.float16),
                                              (("--amp", "--amp-dtype", "bfloat16"), torch.bfloat16)])  # fmt: skip
def test_gpu_decode_batches_come_in_the_amp_dtype(imagenet_tiny, monkeypatch, flags, dtype):
    """The H100 A/B's pick (RESULTS 9, run 6): the trainer's GPU pipeline returns batches in the autocast dtype."""
    made = {}
    monkeypatch.setattr(runner, "GpuDecodeLoader", lambda samples, **kwargs: made.update(kwargs))
    cfg = _cfg(imagenet_tiny, *flags)
    train = IndexedDataset(create_dataset(name="", root=imagenet_tiny, split="train", is_training=True))
    data = runner.Data(train=train, val=None, num_classes=2, mean=(0.5,) * 3, std=(0.5,) * 3, img_size=64)
    runner._gpu_decode_loader(cfg, data, sampler=[0], device=torch.device("cuda"))  # a device object; no GPU used
    assert made["dtype"] == dtype and "pin_memory" not in made and "pad" not in made, made


def test_sync_bn_converts_every_batchnorm_and_keeps_the_checkpoint_format():
    """--sync-bn under DDP: plain and timm BatchNorm layers become SyncBatchNorm with the same parameters and
    state-dict keys (checkpoints and exports unchanged); one process is left alone; it turns --dist-bn off."""
    from timm.layers import BatchNormAct2d

    from dap_pretrain.runner import _batchnorm_across_processes

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), BatchNormAct2d(4))

    cfg = _cfg("unused", "--sync-bn")
    assert cfg.dist_bn == "" and _cfg("unused").dist_bn == "reduce"
    plain = net()
    synced, note = _batchnorm_across_processes(net(), cfg, world=2)
    kinds = [type(m) for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(kinds) == 2 and all(issubclass(k, torch.nn.SyncBatchNorm) for k in kinds), kinds
    assert synced.state_dict().keys() == plain.state_dict().keys() and "2 processes" in note
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in synced.state_dict().items())
    alone, note = _batchnorm_across_processes(plain, cfg, world=1)
    assert alone is plain and "one process" in note
    assert _batchnorm_across_processes(torch.nn.Linear(2, 2), cfg, world=2)[1] == ""  # no BatchNorm: nothing to say


def test_initial_checkpoint_starts_from_those_weights_at_epoch_0(tmp_path, cifar_tiny, capsys):
    """timm's --initial-checkpoint: at --lr 0 a run started from run A's last.pth.tar ends with A's weights (BatchNorm
    running statistics aside: they move in train mode); it counts its own epochs; an export's backbone.pth, or
    weights with another class count, load all but the classifier, which stays as initialised (before: refused);
    a file that is missing, a folder, or weights of another model are one line, before the run folder is made."""
    from dap_pretrain.train import main as train_main

    flags = ["--data-dir", str(cifar_tiny), "--dap-warmup", "0", "-b", "50", "--workers", "0", "--no-plot"]
    train_main([*flags, "--epochs", "1", "--output", str(tmp_path / "a")])
    train_main([*flags, "--epochs", "2", "--lr", "0", "--initial-checkpoint", str(tmp_path / "a" / "last.pth.tar"),
                "--output", str(tmp_path / "b")])  # fmt: skip
    a, b = (torch.load(tmp_path / n / "last.pth.tar", weights_only=False) for n in "ab")
    params = [k for k in a["state_dict"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in params)
    assert b["epoch"] == 2 and not torch.equal(a["state_dict"]["conv1.weight"], _fresh_conv1())
    # an export's backbone.pth (no classifier), or weights with another class count: all but the classifier load
    from dap_pretrain.export import export_backbone

    export = export_backbone(tmp_path / "a" / "last.pth.tar", tmp_path / "export")
    other = tmp_path / "100_classes.pth"
    torch.save({**a["state_dict"], "fc.weight": torch.zeros(100, 64), "fc.bias": torch.zeros(100)}, other)
    for name, source, says in (("c", export / "backbone.pth", "no"), ("d", other, "another")):
        capsys.readouterr()
        train_main([*flags, "--epochs", "1", "--lr", "0", "--initial-checkpoint", str(source),
                    "--output", str(tmp_path / name)])  # fmt: skip
        assert (
            f"classifier (fc.bias, fc.weight) as initialised: the file has {says} classifier"
            in (tmp_path / name / "log.txt").read_text()
        )
        trained = torch.load(tmp_path / name / "last.pth.tar", weights_only=False)["state_dict"]
        assert all(torch.equal(a["state_dict"][k], trained[k]) for k in params if not k.startswith("fc."))
        assert not torch.equal(a["state_dict"]["fc.weight"], trained["fc.weight"])  # its own, fresh
    truncated, pointer = tmp_path / "truncated.pth", tmp_path / "pointer.safetensors"
    truncated.write_bytes((tmp_path / "a" / "last.pth.tar").read_bytes()[:50_000])  # a download cut short
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 46830571\n")  # LFS, not pulled
    refusals = {"does not exist": [str(tmp_path / "none.pth")],
                "is a folder; pass a weights file, e.g.": [str(export)],
                "does not fit model": [str(tmp_path / "a" / "last.pth.tar"), "--model", "cifar_resnet56"],
                "truncated.pth is not a readable weights file (": [str(truncated)],
                "pointer.safetensors is not a readable weights file (Error while": [str(pointer)]}  # fmt: skip
    for words, extra in refusals.items():
        with pytest.raises(SystemExit):
            cli([*flags, "--epochs", "1", "--output", str(tmp_path / "refused"), "--initial-checkpoint", *extra])
        assert words in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_resume_with_other_model_kwargs_is_refused_in_one_line(tmp_path, cifar_tiny, capsys):
    """--model-kwargs define the model (and export rebuilds it from the checkpoint's), so a resume must pass the
    checkpoint's: leaving them out, or changing them, is one line naming both sets, and the run folder is kept as
    it was; with the same keywords the (finished) run resumes and reports its result again."""
    from dap_pretrain.train import main as train_main

    run = tmp_path / "run"
    flags = ["--data-dir", str(cifar_tiny), "--dap-warmup", "0", "-b", "100", "--workers", "0", "--no-plot",
             "--epochs", "1", "--output", str(run)]  # fmt: skip
    first = train_main([*flags, "--model-kwargs", "shortcut=B"])
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    resume = [*flags, "--resume", str(run / "last.pth.tar")]
    for extra, had_now in (([], "shortcut=B, this run has none"),
                           (["--model-kwargs", "shortcut=A"], "shortcut=B, this run has shortcut=A")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            cli([*resume, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and f"trained with --model-kwargs {had_now}" in err[0], err
        assert "resume with the checkpoint's --model-kwargs" in err[0]
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == kept
    assert train_main([*resume, "--model-kwargs", "shortcut=B"])["top1"] == first["top1"]  # the finished run, again


def _fresh_conv1() -> torch.Tensor:
    import timm

    torch.manual_seed(42)  # the trainer's default --seed, rank 0
    return timm.create_model("cifar_resnet20", num_classes=10).state_dict()["conv1.weight"]


def test_grad_checkpointing_and_model_kwargs_reach_the_timm_model(imagenet_tiny, capsys):
    """--grad-checkpointing trains the same parameters (recomputing activations); --model-kwargs reaches
    timm.create_model; a model without the one or a keyword it lacks, or a keyword given twice, is one line."""
    grads = []
    for flags in ((), ("--grad-checkpointing",)):
        model = runner._build_model(_cfg(imagenet_tiny, *flags), 4, torch.device("cpu"))
        torch.manual_seed(0)
        model.load_state_dict(runner._build_model(_cfg(imagenet_tiny), 4, torch.device("cpu")).state_dict())
        x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
        grads.append([p.grad for p in model.parameters()])
        assert model.grad_checkpointing == bool(flags)  # timm's switch, read by its forward
    assert all(torch.allclose(g0, g1, atol=1e-6) for g0, g1 in zip(*grads, strict=True))
    model = runner._build_model(_cfg(imagenet_tiny, "--model-kwargs", "stem_type=deep"), 4, torch.device("cpu"))
    assert isinstance(model.conv1, torch.nn.Sequential)  # timm's deep stem
    refusals = {"has no gradient checkpointing": ("--model", "cifar_resnet20", "--grad-checkpointing"),
                "does not take --model-kwargs no_such": ("--model-kwargs", "no_such=1"),
                "give each keyword once": ("--drop-path", "0.1", "--model-kwargs", "drop_path_rate=0.2"),
                "drop it and pass --num-classes": ("--model-kwargs", "num_classes=5")}  # fmt: skip
    for words, flags in refusals.items():
        with pytest.raises(UsageError, match=words):
            runner._build_model(_cfg(imagenet_tiny, *flags), 4, torch.device("cpu"))
    with pytest.raises(UsageError, match="choose one"):
        _cfg(imagenet_tiny, "--grad-checkpointing", "--cuda-graph")


def test_val_interval_is_timms_name_for_eval_interval():
    assert _cfg("d", "--val-interval", "3").eval_interval == 3 == _cfg("d", "--eval-interval", "3").eval_interval


@pytest.mark.parametrize("mode", ["norm", "value", "agc"])
def test_clip_mode_clips_the_update_as_timm_does(mode):
    """--clip-grad V --clip-mode: with SGD at lr 1 the update is minus the clipped gradient; norm scales the whole
    gradient to norm V, value clamps each element to [-V, V], agc (adaptive, per unit) leaves the classifier alone."""
    from dap_pretrain.engine import train_one_epoch

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    x, y = torch.randn(6, 4) * 10, torch.tensor([0, 1, 2, 0, 1, 2])
    ref = model()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    grads = [p.grad for p in ref.parameters()]
    net, clip = model(), 0.01
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    train_one_epoch(net, [(x, y, torch.arange(6))], opt, epoch=0, sampler=RecordingSampler(), lr_scheduler=FixedLR(),
                    device=torch.device("cpu"), clip_grad=clip, clip_mode=mode, show_progress=False)  # fmt: skip
    steps = [b - p.detach() for b, p in zip(before, net.parameters(), strict=True)]
    if mode == "norm":
        scale = clip / torch.cat([g.flatten() for g in grads]).norm()
        expected = [g * scale for g in grads]
    elif mode == "value":
        expected = [g.clamp(-clip, clip) for g in grads]
    else:  # the classifier's weight and bias: unclipped; the first layer: clipped below its gradient
        expected = steps[:2] + grads[2:]
        assert all(s.abs().sum() < g.abs().sum() for s, g in zip(steps[:2], grads[:2], strict=True))
    for s, e in zip(steps, expected, strict=True):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-7)


def test_opt_kwargs_reach_timms_optimizer_factory(cifar_tiny):
    from dap_pretrain.config import optimizer_kwargs

    net = torch.nn.Linear(2, 2)
    assert runner._build_optimizer(_cfg(cifar_tiny), net).defaults["nesterov"]  # timm's sgd
    assert not runner._build_optimizer(_cfg(cifar_tiny, "--opt-kwargs", "nesterov=False"), net).defaults["nesterov"]
    with pytest.raises(ValueError, match="--opt-kwargs sets lr, which a flag sets too"):
        optimizer_kwargs(_cfg(cifar_tiny, "--opt-kwargs", "lr=0.5"))


def test_log_interval_logs_a_line_every_n_steps(tmp_path, cifar_tiny):
    """timm's --log-interval: a line every N steps (and at the last), with loss, LR and rate. It was logged at DEBUG,
    under the INFO log every run keeps, so an epoch printed nothing until it ended."""
    from dap_pretrain.train import main as train_main

    train_main(["--data-dir", str(cifar_tiny), "--epochs", "1", "--dap-warmup", "0", "-b", "50", "--workers", "0",
                "--no-plot", "--log-interval", "3", "--output", str(tmp_path / "r")])  # fmt: skip
    log = (tmp_path / "r" / "log.txt").read_text().splitlines()
    steps = [line.split(" ", 1)[1] for line in log if " step " in line]  # less the time of day
    assert [m.split(" loss ")[0] for m in steps] == [f"epoch 1 step {i}/8" for i in (0, 3, 6, 7)], steps
    assert all(m.endswith("img/s") and " lr " in m for m in steps)


def test_a_timm_flag_the_trainer_lacks_is_named_with_what_to_use(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--input-size", "3", "224", "224", "--no-resume-opt", "--output", "o"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert "timm's --input-size: use --img-size N" in err and "timm's --no-resume-opt: not supported" in err


def test_infobatch_flags_without_infobatch_are_refused(capsys):
    """--infobatch-ratio 0.3 with DaP (the default policy) was silently ignored."""
    with pytest.raises(SystemExit) as e:
        cli(["--infobatch-ratio", "0.3", "--output", "o"])
    assert e.value.code == 2
    assert "--infobatch-ratio set InfoBatch's policy; add --dap-select infobatch" in capsys.readouterr().err
    assert parse_args(["--infobatch-ratio", "0.3", "--dap-select", "infobatch"]).infobatch_ratio == 0.3


def test_resume_without_output_continues_in_the_checkpoints_folder(tmp_path):
    """timm users resume with --resume alone; the run went to runs/default (and logged that the best checkpoint of
    the resumed run was gone). It now continues in the checkpoint's folder; --output still wins when given."""
    ckpt = str(tmp_path / "a" / "last.pth.tar")
    assert parse_args(["--resume", ckpt]).output == str(tmp_path / "a")
    assert parse_args(["--resume", ckpt, "--output", "elsewhere"]).output == "elsewhere"
    assert parse_args([]).output == "runs/default"


def test_help_shows_each_flags_default_and_says_they_are_the_papers():
    """--help showed no default (most differ from timm's) and opened with developer notes; now a user's description
    and, after each flag's help, its default where it has one."""
    from dap_pretrain.train import build_parser

    parser = build_parser()
    text = " ".join(parser.format_help().split())
    assert "The defaults are the paper's ImageNet recipe" in text and "embedded CIFAR-10 sample" in text
    assert "main() only wires" not in text.replace("`", "")
    entry = parser._get_formatter()._expand_help  # one flag's help as --help prints it
    for flag, default in (("--lr", "0.1"), ("--epochs", "120"), ("--weight-decay", "0.0001"), ("--sched", "step"),
                          ("--dap-keep", "0.9"), ("--workers", "2")):  # fmt: skip
        assert entry(parser._option_string_actions[flag]).endswith(f"(default: {default})"), flag
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: )" not in text
    assert entry(parser._option_string_actions["--warmup-epochs"]).endswith("(default: 0.0)")  # 0 is a default


def test_a_model_that_cannot_take_the_input_size_is_one_line_before_the_run_folder(tmp_path, cifar_tiny, capsys):
    """A ViT is built for 224 px unless given img_size: with --img-size 32 (CIFAR) timm's train.py and this trainer
    passed every check and failed at the first step with a traceback. Now one forward of a zero image at the run's
    size, before anything is written, names the fix; --check runs it too, and torch.compile's options as well."""
    flags = ["--data-dir", str(cifar_tiny), "--epochs", "1", "--dap-warmup", "0", "-b", "4", "--workers", "0"]
    out = tmp_path / "run"
    cases = {
        ("--model", "vit_tiny_patch16_224", "--img-size", "32"): "pass --model-kwargs img_size=32",
        ("--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32"): "pass --img-size 32 to match",
        ("--model", "resnet18", "--img-size", "8", "--check"): None,  # 8 px: resnet's stride leaves 1 px, fine
        ("--model", "inception_v3", "--img-size", "32", "--check"): "pass a larger --img-size",
        ("--model", "resnet18", "--model-kwargs", "in_chans=1", "--check"): "check --model-kwargs (3-channel images",
        ("--torchcompile", "--torchcompile-mode", "fastest", "--check"): "--torchcompile-mode fastest",
    }
    for extra, words in cases.items():
        capsys.readouterr()
        if words is None:
            cli([*flags, "--output", str(out), *extra])
            continue
        with pytest.raises(SystemExit) as exc:
            cli([*flags, "--output", str(out), *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and words in err, err
        assert not out.exists()
    cli([*flags, "--output", str(out), "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32",
         "--img-size", "32", "--no-plot"])  # fmt: skip
    assert (out / "last.pth.tar").is_file()
