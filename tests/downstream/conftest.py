"""Shared fixtures: backbone export folders and the mm-stack guard.

The ResNet-50 exports come from the real trainer and exporter (``dap_pretrain.train`` + ``python -m
dap_pretrain export``); other architectures for the bad-input tests are written by hand in the export format.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
COCO_MINI = DATA / "coco_mini"
COCO_POSE_TINY = DATA / "coco_pose_tiny"

# Trainer flags for the two exports: all data for 2 epochs, and DaP dropping half the data in epoch 2 (75%).
TRAINER_FULL_ARGS = ["--epochs", "2", "--dap-select", "none"]
TRAINER_DAP_ARGS = ["--epochs", "2", "--dap-warmup", "0", "--dap-interval", "1", "--dap-keep", "0.5", "--dap-reuse"]


@pytest.fixture(scope="session")
def mm(require):
    """Skips without mmdet/mmpose locally; under ``CI=true`` a missing mm stack fails the test instead."""
    require("mmcv", "mmdet", "mmpose")


def write_export(out_dir: Path, *, model: str, compute_fraction: float, seed: int) -> Path:
    """Writes an export folder in ``dap_pretrain.export``'s format from an untrained timm model."""
    out_dir.mkdir(parents=True)
    with torch.random.fork_rng():  # a seeded init without reseeding the session's global RNG
        torch.manual_seed(seed)
        net = timm.create_model(model, pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out_dir / "model.safetensors")
    net.reset_classifier(0)
    torch.save(net.state_dict(), out_dir / "backbone.pth")
    meta = {
        "model": model,
        "compute_fraction_measured": compute_fraction,
        "compute_fraction_planned": compute_fraction,
        "top1": None,
        "top5": None,
        "dap": {"enabled": compute_fraction < 1.0},
        "dataset": "untrained (tests/downstream/conftest.py)",
        "epochs": 0,
        "git_commit": None,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def train_export(out_dir: Path, *, data: Path, model: str, extra_args: list[str]) -> Path:
    """Trains on real ImageNet images at 64 px and exports it with ``python -m dap_pretrain export``."""
    run_dir = out_dir.parent / f"{out_dir.name}_train"
    cmd = [sys.executable, "-m", "dap_pretrain.train", "--model", model, "--data-dir", str(data), "--aug", "imagenet"]
    cmd += ["--img-size", "64", "-b", "8", "--decay-milestones", "1", "--no-plot", "--output", str(run_dir)]
    cmd += extra_args
    subprocess.run(cmd, check=True, cwd=REPO)
    ckpt = run_dir / "last.pth.tar"
    subprocess.run(
        [sys.executable, "-m", "dap_pretrain", "export", str(ckpt), "--out", str(out_dir)], check=True, cwd=REPO
    )
    shutil.rmtree(run_dir)  # 360 MB of ResNet-50 checkpoints the tests never read again
    return out_dir


@pytest.fixture
def make_export(tmp_path):
    """Factory: ``make_export(name, model=..., compute_fraction=..., seed=...)`` -> a hand-written export folder."""
    return lambda name, **kwargs: write_export(tmp_path / name, **kwargs)


@pytest.fixture(scope="session")
def exports(shared_once, imagenet_tiny) -> dict[str, Path]:
    """Two ResNet-50 export folders: ``'full'`` (100% pre-train compute) and ``'dap'`` (DaP, 75%), both trained."""

    def build(root: Path) -> None:
        train_export(root / "r50_full", data=imagenet_tiny, model="resnet50", extra_args=TRAINER_FULL_ARGS)
        train_export(root / "r50_dap", data=imagenet_tiny, model="resnet50", extra_args=TRAINER_DAP_ARGS)

    root = shared_once("exports", build)  # trained once for both test workers (28 s)
    return {"full": root / "r50_full", "dap": root / "r50_dap"}


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory) -> Path:
    """coco_mini with val cut to its first 20 images that show people with keypoints (the same images in the
    instances and keypoints files), image folders linked read-only: a real COCO evaluation at CPU cost."""
    root = tmp_path_factory.mktemp("coco_mini_val20")
    (root / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (root / split).symlink_to(COCO_MINI / split)
    for name in ("instances_train2017.json", "person_keypoints_train2017.json"):
        (root / "annotations" / name).symlink_to(COCO_MINI / "annotations" / name)
    kpt = json.loads((COCO_MINI / "annotations" / "person_keypoints_val2017.json").read_text())
    with_people = [
        i["id"]
        for i in kpt["images"]
        if any(a["image_id"] == i["id"] and a["num_keypoints"] for a in kpt["annotations"])
    ]
    keep = set(with_people[:20])
    for name in ("instances_val2017.json", "person_keypoints_val2017.json"):
        ann = json.loads((COCO_MINI / "annotations" / name).read_text())
        ann["images"] = [i for i in ann["images"] if i["id"] in keep]
        ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in keep]
        (root / "annotations" / name).write_text(json.dumps(ann))
    return root
