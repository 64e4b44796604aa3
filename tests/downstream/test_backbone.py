"""Exports load into mmdet's / mmpose's ResNet and the timm wrapper; configs override only the backbone."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from downstream import TransferInputError
from downstream.backbone import check_backbone, compare_state_dicts, load_backbone_state_dict, resolve_backbone
from downstream.config import build_transfer_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("det/*.py")) + sorted((REPO / "configs").glob("pose/*.py"))


@pytest.mark.parametrize("package", ["mmdet", "mmpose"])
def test_export_loads_into_mm_resnet_with_no_missing_keys(mm, exports, package):
    if package == "mmdet":
        from mmdet.models.backbones import ResNet
    else:
        from mmpose.models.backbones import ResNet
    ckpt = exports["full"] / "backbone.pth"
    net = ResNet(depth=50, init_cfg=dict(type="Pretrained", checkpoint=str(ckpt)))
    net.init_weights()
    exported = load_backbone_state_dict(ckpt)
    assert compare_state_dicts(checkpoint=exported, reference=net.state_dict()) == []
    for key, value in net.state_dict().items():  # loaded, not merely name-compatible
        torch.testing.assert_close(value, exported[key], msg=key)


def test_wrong_depth_is_reported_even_without_missing_keys(make_export):
    r101 = make_export("r101", model="resnet101", compute_fraction=1.0, seed=0)
    import timm

    reference = timm.create_model("resnet50", num_classes=0).state_dict()
    spec = resolve_backbone(backbone=r101)
    with pytest.raises(TransferInputError, match="unexpected keys, e.g. layer3.6"):
        check_backbone(spec=spec, reference=reference, expected="ResNet-50")


@pytest.mark.parametrize("task", ["faster_rcnn", "simplebaseline"])
def test_timm_wrapper_loads_export_freezes_bn_and_fits_the_head(mm, make_export, tmp_path, task):
    from mmengine.registry import MODELS, init_default_scope

    from downstream.timm_backbone import DaPTimmBackbone

    export = make_export("mbv1", model="mobilenetv1_100", compute_fraction=0.75, seed=3)
    spec = resolve_backbone(backbone=export)
    cfg = build_transfer_config(task=task, spec=spec, data_root=tmp_path, work_dir=tmp_path / "w")
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert isinstance(model.backbone, DaPTimmBackbone)
    exported = load_backbone_state_dict(export / "backbone.pth")
    torch.testing.assert_close(model.backbone.body.conv_stem.weight, exported["conv_stem.weight"])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.zeros(1, 3, 256, 192))
    if task == "faster_rcnn":
        assert model.backbone.out_channels == [128, 256, 512, 1024]
        assert [f.shape[1:] for f in feats][:2] == [(256, 64, 48), (256, 32, 24)]  # FPN levels at stride 4, 8
    else:
        assert model.head(feats).shape == (1, 17, 64, 48)  # heatmaps at 1/4 of 256x192


def test_timm_wrapper_rejects_another_architecture(mm, exports):
    from downstream.timm_backbone import DaPTimmBackbone

    with pytest.raises(ValueError, match="does not fit timm densenet121: .* missing keys"):
        DaPTimmBackbone(model_name="densenet121", checkpoint=str(exports["full"] / "backbone.pth"))


def _stock(tmp_path, path):
    """The stock config our config file inherits, loaded through a one-line config of its own."""
    from mmengine.config import Config

    tree = ast.parse(path.read_text())
    base = next(
        ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "_base_"
    )
    base = next(b for b in ([base] if isinstance(base, str) else base) if b.startswith(("mmdet::", "mmpose::")))
    stub = tmp_path / "stock.py"
    stub.write_text(f"_base_ = {base!r}\n")
    return Config.fromfile(stub)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_overrides_only_the_backbone(mm, tmp_path, path):
    from mmengine.config import Config

    ours, stock = Config.fromfile(path).to_dict(), _stock(tmp_path, path).to_dict()
    backbone = ours["model"]["backbone"]
    if backbone["type"] == "DaPTimmBackbone":
        from downstream.timm_backbone import timm_feature_channels

        channels = timm_feature_channels(backbone["model_name"], backbone["out_indices"])
        consumer, expect = ("neck", channels) if "neck" in ours["model"] else ("head", channels[-1])
        assert ours["model"][consumer]["in_channels"] == expect
        ours["model"][consumer]["in_channels"] = stock["model"][consumer]["in_channels"]
        ours["model"]["backbone"] = stock["model"]["backbone"]
        assert ours.pop("custom_imports") == dict(imports=["downstream.timm_backbone"], allow_failed_imports=False)
        ours.pop("dap_timm_backbone"), ours.pop("dap_timm_backbone_last")  # configs/_base_/dap_timm_backbone.py
    else:
        assert backbone["init_cfg"]["checkpoint"] == "EXPORT_DIR/backbone.pth"
        backbone["init_cfg"]["checkpoint"] = stock["model"]["backbone"]["init_cfg"]["checkpoint"]
    if path.parent.name == "pose":  # ground-truth boxes unless a detection file is given
        for split in ("val_dataloader", "test_dataloader"):
            assert ours[split]["dataset"]["bbox_file"] is None
            ours[split]["dataset"]["bbox_file"] = stock[split]["dataset"]["bbox_file"]
    assert ours == stock


@pytest.mark.parametrize("with_dets", [True, False], ids=["person-dets", "gt-boxes"])
def test_pose_evaluates_detected_boxes_when_given_else_ground_truth(mm, exports, tmp_path, with_dets):
    """On coco_pose_tiny (4 images, 14 people, 118 detected person boxes)."""
    from mmengine.registry import DATASETS, init_default_scope

    tiny = REPO.parent / "shared" / "data" / "coco_pose_tiny"
    dets = tiny / "test_coco_det_AP_H_56.json"
    layout = {"test_dataloader.dataset.ann_file": "test_coco.json", "test_dataloader.dataset.data_prefix": {"img": ""}}
    spec = resolve_backbone(backbone=exports["full"])
    cfg = build_transfer_config(
        task="simplebaseline",
        spec=spec,
        data_root=tiny,
        work_dir=tmp_path,
        cfg_options=layout,
        person_dets=dets if with_dets else None,
    )
    init_default_scope(cfg.default_scope)
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    scores = [float(dataset.get_data_info(i)["bbox_score"][0]) for i in range(len(dataset))]
    if with_dets:
        assert len(dataset) == len(json.loads(dets.read_text())) and min(scores) < 1.0
    else:  # one box per annotated person (with keypoints), scored 1
        n_people = sum(a["num_keypoints"] > 0 for a in json.loads((tiny / "test_coco.json").read_text())["annotations"])
        assert len(dataset) == n_people and set(scores) == {1.0}
