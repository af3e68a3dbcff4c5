"""Model zoo: shapes, grayscale inputs, exact layer/parameter counts and argument errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrpet_lightning.models import available_models, build_model, resnet56, resnet110

CIFAR_MODELS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16_bn",
                "googlenet"]
TV_RESNETS = ["tv_resnet18", "tv_resnet34", "tv_resnet50"]


def _count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _logits(model: nn.Module, in_channels: int, size: int) -> torch.Tensor:
    return model.eval()(torch.randn(2, in_channels, size, size))


def test_available_models_lists_every_name() -> None:
    assert available_models() == sorted(CIFAR_MODELS + TV_RESNETS + ["tv_mobilenet_v2",
                                                                      "resnet1d"])


@pytest.mark.parametrize("name", CIFAR_MODELS)
@pytest.mark.parametrize("in_channels", [3, 1])
def test_cifar_models_output_shape(name: str, in_channels: int) -> None:
    model = build_model(name, num_classes=7, in_channels=in_channels)
    assert _logits(model, in_channels, 32).shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "in_channels"), [*[(n, 3) for n in TV_RESNETS], ("tv_resnet18", 1)]
)
def test_torchvision_resnets_small_input(name: str, in_channels: int) -> None:
    model = build_model(name, num_classes=7, in_channels=in_channels, small_input=True)
    assert model.conv1.in_channels == in_channels
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert _logits(model, in_channels, 32).shape == (2, 7)


@pytest.mark.parametrize("in_channels", [3, 1])
def test_torchvision_plain_stem_at_64(in_channels: int) -> None:
    model = build_model("tv_resnet18", num_classes=5, in_channels=in_channels)
    # The replaced stem keeps the ImageNet geometry; only the input channels change.
    assert model.conv1.in_channels == in_channels
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert model.conv1.padding == (3, 3) and model.conv1.bias is None
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert _logits(model, in_channels, 64).shape == (2, 5)


@pytest.mark.parametrize("in_channels", [3, 1])
def test_torchvision_mobilenet_v2(in_channels: int) -> None:
    model = build_model("tv_mobilenet_v2", num_classes=5, in_channels=in_channels)
    stem = model.features[0][0]
    assert stem.in_channels == in_channels and stem.out_channels == 32 and stem.stride == (2, 2)
    assert _logits(model, in_channels, 32).shape == (2, 5)


def test_resnet56_layer_and_parameter_counts() -> None:
    model = resnet56()
    # 1 stem conv + 3 stages x 9 blocks x 2 convs = 55; option A shortcuts add no convs.
    assert _count(model, nn.Conv2d) == 55
    assert _count(model, nn.Linear) == 1
    # Parameters for 10 classes, conv weights + BN (weight, bias) + Linear:
    #   stem   3*16*9 + 32                                      =     464
    #   stage1 9 * 2 * (16*16*9 + 32)                           =  42,048
    #   stage2 (16*32*9 + 32*32*9 + 2*64) + 8 * 2 * (32*32*9 + 64) = 162,432
    #   stage3 (32*64*9 + 64*64*9 + 2*128) + 8 * 2 * (64*64*9 + 128) = 647,424
    #   linear 64*10 + 10                                       =     650
    # total 853,018 (the "0.85M" of He et al. 2016, Table 6).
    assert _n_params(model) == 853_018


def test_resnet110_layer_count() -> None:
    model = resnet110()
    assert _count(model, nn.Conv2d) == 109  # 1 + 3 stages x 18 blocks x 2 convs
    assert _count(model, nn.Linear) == 1
    assert _n_params(model) == 1_727_962


def test_resnet_downsampling_shortcut_has_no_parameters() -> None:
    block = resnet56().layer2[0]
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    # Original channels in the middle, zeros on both sides.
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_vgg16_bn_structure() -> None:
    model = build_model("vgg16_bn", num_classes=100)
    assert _count(model, nn.Conv2d) == 13
    assert _count(model, nn.BatchNorm2d) == 13
    assert _count(model, nn.Linear) == 1
    assert model.classifier.in_features == 512 and model.classifier.out_features == 100


def test_googlenet_is_the_common_cifar_variant() -> None:
    """192-channel 3x3 pre-layer, Inception a3 b3 | a4-e4 | a5 b5 (7 convs each), one Linear:
    6.17 M parameters and 1.52 G multiply-accumulates at 32x32, the figures usually quoted
    for the CIFAR GoogLeNet."""
    from lrpet_lightning import compression_report

    model = build_model("googlenet", num_classes=10)
    assert model.pre_layers[0].out_channels == 192 and model.pre_layers[0].kernel_size == (3, 3)
    assert _count(model, nn.Conv2d) == 1 + 9 * 7 and _count(model, nn.Linear) == 1
    assert model.linear.in_features == 1024
    assert _n_params(model) == 6_166_250
    widths = {}
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        x = model.b3(model.a3(model.pre_layers(x)))
        widths["b3"] = x.shape[1:]
        x = model.maxpool(x)
        for name in ("a4", "b4", "c4", "d4", "e4"):
            x = getattr(model, name)(x)
        widths["e4"] = x.shape[1:]
        widths["b5"] = model.b5(model.a5(model.maxpool(x))).shape[1:]
    assert widths == {"b3": (480, 32, 32), "e4": (832, 16, 16), "b5": (1024, 8, 8)}
    with torch.device("meta"):
        net = build_model("googlenet")
        macs = compression_report(net, net, torch.zeros(1, 3, 32, 32)).dense_flops / 2
    assert macs == pytest.approx(1.52e9, rel=0.005)  # the report counts 2 FLOPs per MAC


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match=r"name='resnet9000'.*resnet20.*tv_resnet50"):
        build_model("resnet9000")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": 0}, ValueError, r"num_classes.*0"),
        ({"num_classes": -3}, ValueError, r"num_classes.*-3"),
        ({"in_channels": 0}, ValueError, r"in_channels.*0"),
        ({"num_classes": 2.5}, TypeError, r"num_classes.*2\.5"),
        ({"in_channels": True}, TypeError, r"in_channels.*True"),
    ],
)
def test_bad_sizes_raise(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build_model("resnet20", **kwargs)


def test_small_input_rejected_for_mobilenet() -> None:
    with pytest.raises(ValueError, match=r"small_input.*tv_mobilenet_v2"):
        build_model("tv_mobilenet_v2", small_input=True)


def test_models_package_imports_no_lightning_or_hydra() -> None:
    # Checked on the source, not sys.modules: importing lrpet_lightning.models also runs the
    # parent package's __init__, which may legitimately pull in lightning.
    import ast
    from pathlib import Path

    import lrpet_lightning.models as models

    forbidden = {"lightning", "pytorch_lightning", "hydra", "omegaconf"}
    for path in Path(models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & forbidden, f"{path.name} imports {roots & forbidden}"
