"""Releases in the ecosystems' own formats: both front ends' checkpoints -> timm hub layout + DaP files.

A release must load in plain timm (``local-dir:``) in a process that never imports dap_pretrain, through
``load_backbone`` from a folder, ``local-dir:`` or a bare file, and a damaged file must be refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from dap_pretrain.checkpoint import CheckpointError, save_checkpoint
from dap_pretrain.cli import main as cli_main
from dap_pretrain.export import RELEASE_FILES, export_backbone, load_backbone
from dap_pretrain.train import main as train_main

# resnet18 at 32 px on the 400 CIFAR training images: epoch 1 on all data, epoch 2 on half (75% compute).
TRAIN = ["--model", "resnet18", "--img-size", "32", "-b", "64", "--workers", "1", "--epochs", "2"]
TRAIN += ["--decay-milestones", "1", "--dap-warmup", "0", "--dap-interval", "1", "--dap-keep", "0.5", "--dap-reuse"]
TRAIN += ["--no-plot"]
# What an mmpretrain run's DaP hook records (the timm trainer's run.json keys plus the timm name and class count).
MM_RUN = {
    "timm_model": "resnet18",
    "num_classes": 7,
    "epochs": 4,
    "compute_fraction_planned": 0.6875,
    "compute_fraction_measured": 0.6875,
    "top1": 12.5,
    "top5": 50.0,
    "dap": {"keep": 0.5, "warmup": 1, "interval": 1, "reuse": []},
    "dataset": "tests/test_export.py (synthetic)",
    "git_commit": "0123abc",
}
# Loads each local-dir release with timm alone and saves its state dict; fails if dap_pretrain got imported.
PLAIN_TIMM = """
import sys, timm, torch
for folder, dst in zip(sys.argv[1::2], sys.argv[2::2]):
    torch.save(timm.create_model("local-dir:" + folder, pretrained=True).state_dict(), dst)
assert "dap_pretrain" not in sys.modules, sorted(m for m in sys.modules if m.startswith("dap"))
"""


def _mm_checkpoint(path: Path, *, run: dict = MM_RUN, nan: bool = False) -> dict[str, torch.Tensor]:
    """Write an mmengine-style checkpoint of a seeded timm resnet18 under mmpretrain's key names.

    Returns the timm state dict it holds. The message hub is an object ``weights_only=True`` refuses, as
    mmengine's real one is (it pickles ``HistoryBuffer`` methods).
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = timm.create_model("resnet18", num_classes=run.get("num_classes") or 7)
    weights = net.state_dict()
    if nan:
        weights["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state_dict = {(f"head.{k}" if k.startswith("fc.") else f"backbone.{k}"): v for k, v in weights.items()}
    ckpt = {
        "meta": {"epoch": 4, "iter": 28, "mmengine_version": "0.10.7", "seed": 0},
        "state_dict": state_dict,
        "message_hub": argparse.Namespace(log_scalars={"train/loss": [2.3, 2.1]}),
        "optimizer": {"state": {}, "param_groups": []},
        "dap": {"run": run, "sampler": {}},
    }
    torch.save(ckpt, path)
    return weights


@pytest.fixture(scope="module")
def trainer_release(tmp_path_factory, cifar_tiny) -> tuple[Path, dict]:
    """A release exported from a real 2-epoch DaP run of the timm trainer, and the run's summary."""
    root = tmp_path_factory.mktemp("trainer_release")
    summary = train_main([*TRAIN, "--data-dir", str(cifar_tiny), "--output", str(root / "run")])
    return export_backbone(root / "run" / "last.pth.tar", root / "release"), summary


@pytest.fixture(scope="module")
def mm_release(tmp_path_factory) -> tuple[Path, dict]:
    """A release exported by ``python -m dap_pretrain export`` from an mmengine checkpoint, and its timm weights."""
    root = tmp_path_factory.mktemp("mm_release")
    weights = _mm_checkpoint(root / "epoch_4.pth")
    assert cli_main(["export", str(root / "epoch_4.pth"), "--out", str(root / "release")]) == 0
    return root / "release", weights


def test_releases_load_in_plain_timm_without_dap_pretrain(trainer_release, mm_release, tmp_path):
    (trainer, _), (mm, mm_weights) = trainer_release, mm_release
    argv = [str(trainer), str(tmp_path / "trainer.pt"), str(mm), str(tmp_path / "mm.pt")]
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TIMM, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    trained = torch.load(trainer.parent / "run" / "last.pth.tar", weights_only=True)["state_dict"]
    for got, want in ((tmp_path / "trainer.pt", trained), (tmp_path / "mm.pt", mm_weights)):
        loaded = torch.load(got, weights_only=True)
        assert loaded.keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(loaded[k], v), k


def test_trainer_release_layout_and_meta(trainer_release):
    release, summary = trainer_release
    assert sorted(p.name for p in release.iterdir()) == sorted(RELEASE_FILES)
    config = json.loads((release / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 10 and config["num_features"] == 512
    cfg = config["pretrained_cfg"]
    assert cfg["num_classes"] == 10 and cfg["input_size"] == [3, 32, 32] and cfg["crop_pct"] == 1.0
    assert "paper_ids" not in cfg and "tag" not in cfg  # timm's own weights' provenance is not ours
    assert config["dap_pretrain"] == {"meta": "meta.json", "timm_native": True}
    meta = json.loads((release / "meta.json").read_text())
    assert meta["trainer"] == "dap-train" and meta["weights"] == "raw" and meta["epochs_completed"] == 2
    assert meta["compute_fraction_measured"] == pytest.approx(summary["compute_fraction_measured"]) == 0.75
    assert meta["top1"] == pytest.approx(summary["top1"])


def test_mm_checkpoint_gives_the_same_release(trainer_release, mm_release):
    import torchvision

    (trainer, _), (mm, _) = trainer_release, mm_release
    assert sorted(p.name for p in mm.iterdir()) == sorted(RELEASE_FILES)
    meta, trainer_meta = json.loads((mm / "meta.json").read_text()), json.loads((trainer / "meta.json").read_text())
    assert meta.keys() == trainer_meta.keys()
    assert meta["trainer"] == "mmengine" and meta["num_classes"] == 7 and meta["epochs_completed"] == 4
    for key in ("compute_fraction_planned", "compute_fraction_measured", "top1", "top5", "dap", "git_commit"):
        assert meta[key] == MM_RUN[key], key
    config = json.loads((mm / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 7
    backbone = torch.load(mm / "backbone.pth", weights_only=True)  # what mmdet/mmpose's init_cfg loads
    assert set(backbone) == {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}


def test_load_backbone_from_folder_local_dir_and_bare_files(mm_release, tmp_path):
    release, weights = mm_release
    for source in (release, f"local-dir:{release}"):
        net = load_backbone(source)
        assert net.num_classes == 7
        assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())
    no_meta = shutil.copytree(release, tmp_path / "no_meta")
    (no_meta / "meta.json").unlink()  # config.json names the model
    assert load_backbone(no_meta).num_classes == 7
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(release / "model.safetensors", bare / "weights.safetensors")
    with pytest.raises(CheckpointError, match="pass model="):
        load_backbone(bare / "weights.safetensors")
    net = load_backbone(bare / "weights.safetensors", model="resnet18")  # 7 classes, read off fc.weight
    assert net.num_classes == 7 and torch.equal(net.fc.weight, weights["fc.weight"])
    shutil.copy(release / "backbone.pth", bare / "backbone.pth")
    feats = load_backbone(bare / "backbone.pth", model="resnet18", features_only=True, out_indices=(3, 4))
    assert [f.shape[1] for f in feats(torch.randn(1, 3, 64, 64))] == [256, 512]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_tampered_safetensors_is_refused_in_one_line(mm_release, tmp_path, bad):
    release = shutil.copytree(mm_release[0], tmp_path / "tampered")
    weights = load_file(release / "model.safetensors")
    weights["layer3.1.bn2.running_var"][5] = bad
    save_file(weights, release / "model.safetensors")
    for source in (release, f"local-dir:{release}", release / "model.safetensors"):
        with pytest.raises(CheckpointError, match="NaN/inf") as e:
            load_backbone(source)
        assert "\n" not in str(e.value) and str(release / "model.safetensors") in str(e.value)
        assert "re-export" in str(e.value)


def test_export_refuses_bad_mm_checkpoints(tmp_path):
    _mm_checkpoint(tmp_path / "nan.pth", nan=True)
    with pytest.raises(CheckpointError, match="NaN/inf.*layer2.0.conv1.weight"):
        export_backbone(tmp_path / "nan.pth", tmp_path / "out")
    _mm_checkpoint(tmp_path / "r34.pth", run={**MM_RUN, "timm_model": "resnet34"})
    with pytest.raises(CheckpointError, match="not timm 'resnet34'"):
        export_backbone(tmp_path / "r34.pth", tmp_path / "out")
    _mm_checkpoint(tmp_path / "plain.pth", run={})
    with pytest.raises(CheckpointError, match="timm_model"):
        export_backbone(tmp_path / "plain.pth", tmp_path / "out")
    _mm_checkpoint(tmp_path / "v1d.pth", run={"model": "mmpretrain:ResNetV1d", "timm_model": None})  # was: "not
    with pytest.raises(CheckpointError, match="ResNetV1d backbone, which has no timm equivalent"):  # by pretrain_mm"
        export_backbone(tmp_path / "v1d.pth", tmp_path / "out")
    (tmp_path / "summary.csv").write_text("epoch,train_loss\n1,2.3\n")  # a run's other file, passed by mistake
    with pytest.raises(CheckpointError, match=r"unreadable \(not a torch checkpoint: torch.save writes a zip") as e:
        export_backbone(tmp_path / "summary.csv", tmp_path / "out")
    assert "pop from empty list" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cifar_release_says_it_needs_dap_pretrain(tmp_path):
    net = timm.create_model("cifar_resnet20", num_classes=10)
    ckpt = {"arch": "cifar_resnet20", "num_classes": 10, "epoch": 1, "state_dict": net.state_dict()}
    release = export_backbone(save_checkpoint(ckpt, tmp_path / "last.pth.tar"), tmp_path / "release")
    config = json.loads((release / "config.json").read_text())
    assert (
        config["dap_pretrain"]["timm_native"] is False and "import dap_pretrain" in config["dap_pretrain"]["requires"]
    )
    loaded = timm.create_model(f"local-dir:{release}", pretrained=True)  # dap_pretrain is imported here
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_mm_release_loads_into_mmdet_resnet(mm_release, require):
    """backbone.pth of an mmengine-path release initialises mmdet's ResNet (the transfer configs' backbone)."""
    require("mmdet")
    from mmdet.models.backbones import ResNet

    from downstream.backbone import check_backbone, resolve_backbone

    release, weights = mm_release
    spec = resolve_backbone(backbone=release)
    net = ResNet(depth=18, init_cfg=dict(type="Pretrained", checkpoint=str(spec.checkpoint)))
    net.init_weights()
    check_backbone(spec=spec, reference=net.state_dict(), expected="mmdet ResNet-18")
    for key, value in net.state_dict().items():  # loaded, not merely name-compatible
        assert torch.equal(value, weights[key]), key


def test_local_dir_model_resaved_for_the_hub_keeps_weights_and_provenance(mm_release, tmp_path):
    """docs/MODEL_ZOO.md's upload recipe, offline: save_for_hf is what push_to_hf_hub writes and uploads."""
    release, weights = mm_release
    model = timm.create_model(f"local-dir:{release}", pretrained=True)
    meta = json.loads((release / "meta.json").read_text())
    timm.models.save_for_hf(model, tmp_path / "hub", safe_serialization=True, model_config={"dap_pretrain": meta})
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["dap_pretrain"] == meta and "paper_ids" not in config["pretrained_cfg"]
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True)
    assert all(torch.equal(v, weights[k]) for k, v in reloaded.state_dict().items())


def test_export_into_a_file_is_one_line_and_release_files_are_world_readable(mm_release, tmp_path, capsys):
    """Issue 11 fault 5: ``export --out`` under a file is one line, exit 2; release files are 0644 (were 0600)."""
    release, _ = mm_release
    for name in ("model.safetensors", "backbone.pth", "meta.json", "config.json"):
        assert (release / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    src = release.parent / "epoch_4.pth"
    with pytest.raises(SystemExit) as e:
        cli_main(["export", str(src), "--out", str(blocker / "release")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "is a file" in err, err
    assert blocker.read_text() == "x"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_with_timm_whose_config_writer_has_no_data_config(mm_release, tmp_path, monkeypatch):
    """timm 1.0.29 (the GPU machines') has save_config_for_hf(model, path) without data_config: same config.json."""
    import timm.models._hub as hub

    new = json.loads((mm_release[0] / "config.json").read_text())
    real = hub.save_config_for_hf

    def old_writer(model, config_path, model_config=None, model_args=None):
        assert isinstance(config_path, Path)  # 1.0.29 calls config_path.open()
        return real(model, config_path)

    monkeypatch.setattr(hub, "save_config_for_hf", old_writer)
    out = tmp_path / "release"
    assert cli_main(["export", str(mm_release[0].parent / "epoch_4.pth"), "--out", str(out)]) == 0
    old = json.loads((out / "config.json").read_text())
    for key in ("input_size", "crop_pct", "interpolation", "mean", "std"):
        assert old["pretrained_cfg"][key] == new["pretrained_cfg"][key], key


def test_a_run_with_model_kwargs_exports_the_architecture_it_trained(tmp_path, cifar_tiny):
    """--model-kwargs shortcut=B (projection shortcuts: more weights than the default A) reaches the checkpoint, and
    the release builds that architecture: meta.json, timm's config.json model_args, local-dir and load_backbone.
    COCO transfer, whose stock configs cannot build it, refuses it in one line."""
    from downstream.backbone import TransferInputError, resolve_backbone

    run = tmp_path / "run"
    train_main(["--data-dir", str(cifar_tiny), "--epochs", "1", "--dap-warmup", "0", "-b", "100", "--workers", "0",
                "--no-plot", "--model-kwargs", "shortcut=B", "--output", str(run)])  # fmt: skip
    trained = torch.load(run / "last.pth.tar", weights_only=True)["state_dict"]
    assert "layer2.0.downsample.0.weight" in trained  # a projection conv: not in the default architecture
    release = export_backbone(run / "last.pth.tar", tmp_path / "release")
    assert json.loads((release / "meta.json").read_text())["model_kwargs"] == {"shortcut": "B"}
    assert json.loads((release / "config.json").read_text())["model_args"]["shortcut"] == "B"
    for net in (timm.create_model(f"local-dir:{release}", pretrained=True), load_backbone(release)):
        assert net.state_dict().keys() == trained.keys()
        assert all(torch.equal(v, trained[k]) for k, v in net.state_dict().items())
    with pytest.raises(TransferInputError, match="trained with --model-kwargs"):
        resolve_backbone(backbone=release)


@pytest.mark.parametrize(
    ("version", "run", "ema_label", "raw_label"),
    [
        (2, {"top1": 65.0, "ema_top1": 71.0}, 71.0, 65.0),  # EMAHook(evaluate_on_origin=True): both measured
        (2, {"top1": None, "ema_top1": 71.0}, 71.0, None),  # the EMA weights validated, the raw ones never
        (2, {"top1": 70.0, "ema_top1": None}, None, 70.0),  # EMAHook(evaluate_on_ema=False): the raw ones only
        (1, {"top1": None, "ema_top1": 71.0}, 71.0, None),  # session 15's hook: the EMA's figure as ema_top1
        (1, {"top1": 71.0, "ema_top1": None}, 71.0, None),  # before it: the EMA's figure as top1
    ],
)
def test_mm_exports_label_ema_and_raw_weights_with_their_own_top1(version, run, ema_label, raw_label):
    """An mmengine checkpoint with EMA weights: each export carries the top-1 measured on the weights it releases,
    None where those weights were never validated. Checkpoints of the hook's state version 1 read as they did."""
    from dap_pretrain.export import _from_mmengine

    weights = {"backbone.conv1.weight": torch.zeros(1)}
    ckpt = {
        "state_dict": weights,  # mmengine's EMAHook swaps on save: the EMA weights here, the raw ones below
        "ema_state_dict": {"module.backbone.conv1.weight": torch.ones(1)},
        "dap": {"version": version, "run": {"timm_model": "resnet18", "num_classes": 10, **run}},
    }
    for use_ema, label, kind in ((True, ema_label, "ema"), (False, raw_label, "raw")):
        trained = _from_mmengine(ckpt, use_ema=use_ema, path=Path("epoch_1.pth"))
        assert trained.weights_kind == kind and trained.run["top1"] == label
        assert float(trained.weights["conv1.weight"]) == (1.0 if kind == "raw" else 0.0)
