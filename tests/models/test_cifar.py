"""The paper's CIFAR networks as timm models: sizes match the papers, and timm's interfaces work on them."""

import pytest
import timm
import torch

import dap_pretrain.models  # noqa: F401  registers the models

# name -> parameters at 10 classes as the papers report them (He et al. 2016 Table 6; He et al. 2016 "Identity
# Mappings"; Huang et al. 2017 Table 2)
PAPER_PARAMS = {
    "cifar_resnet20": 0.27e6,
    "cifar_resnet56": 0.85e6,
    "cifar_resnet110": 1.7e6,
    "cifar_resnet164": 1.7e6,
    "cifar_densenet_bc100": 0.8e6,
}
FEATURE_CHANNELS = {
    "cifar_resnet20": [16, 32, 64],
    "cifar_resnet56": [16, 32, 64],
    "cifar_resnet110": [16, 32, 64],
    "cifar_resnet164": [64, 128, 256],
    "cifar_densenet_bc100": [216, 300, 342],
}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_param_count_matches_paper(name):
    model = timm.create_model(name)
    assert abs(_num_params(model) / PAPER_PARAMS[name] - 1) < 0.05


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_forward_shapes_and_timm_head_interface(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 8, 8)
        assert model(x).shape == (2, 10)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.channels() == FEATURE_CHANNELS[name]
    assert model.feature_info.reduction() == [1, 2, 4]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 32, 32))
    expected = [(1, c, 32 // r, 32 // r) for c, r in zip(FEATURE_CHANNELS[name], [1, 2, 4], strict=True)]
    assert [tuple(f.shape) for f in feats] == expected


def test_num_classes_and_default_cfg():
    model = timm.create_model("cifar_resnet110", num_classes=100)
    assert model.get_classifier().out_features == 100
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 10 and cfg["input_size"] == (3, 32, 32) and cfg["classifier"] == "fc"
    assert timm.data.resolve_data_config({}, model=model)["mean"] == pytest.approx((0.4914, 0.4822, 0.4465))


def test_features_only_out_indices_and_shortcut_b():
    model = timm.create_model("cifar_resnet20", features_only=True, out_indices=(2,))
    assert model.feature_info.channels() == [64]
    # option B adds 1x1 projections (+BN) at the two stage transitions: 16*32 + 32*64 weights, 2*(32+64) BN params
    assert _num_params(timm.create_model("cifar_resnet20", shortcut="B")) == 269_722 + 16 * 32 + 32 * 64 + 2 * 96


def test_invalid_depth_is_refused():
    with pytest.raises(ValueError, match="6n\\+2"):
        dap_pretrain.models.CifarResNet(depth=21)
