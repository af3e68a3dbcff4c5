"""Build models by name: the CIFAR zoo in this package (ResNets, VGG-16-BN, GoogLeNet), a 1-D
ResNet for sequences, plus a few torchvision models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn

from lrpet_lightning.core.checks import check_bool, check_int

from .cifar_resnet import resnet20, resnet32, resnet44, resnet56, resnet110
from .googlenet import googlenet
from .resnet1d import resnet1d
from .vgg import vgg16_bn

__all__ = ["available_models", "build_model"]

_CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg16_bn": vgg16_bn,
    "googlenet": googlenet,
    # (N, C, L) sequences, e.g. MNIST-1D's (N, 1, 40); same (num_classes, in_channels) builder.
    "resnet1d": resnet1d,
}

# Registry name -> torchvision builder name.
_TORCHVISION_MODELS: dict[str, str] = {
    "tv_resnet18": "resnet18",
    "tv_resnet34": "resnet34",
    "tv_resnet50": "resnet50",
    "tv_mobilenet_v2": "mobilenet_v2",
}


def available_models() -> list[str]:
    """Return the names accepted by :func:`build_model`, sorted."""
    return sorted([*_CIFAR_MODELS, *_TORCHVISION_MODELS])


def _replace_conv(old: nn.Conv2d, in_channels: int, **overrides: Any) -> nn.Conv2d:
    """A fresh Conv2d like ``old`` but taking ``in_channels``, with some settings overridden."""
    settings: dict[str, Any] = dict(
        out_channels=old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        bias=old.bias is not None,
    )
    settings.update(overrides)
    conv = nn.Conv2d(in_channels, **settings)
    # torchvision ResNets/MobileNet init convs with Kaiming fan_out; keep that for the new stem.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _build_torchvision(
    name: str, num_classes: int, in_channels: int, small_input: bool
) -> nn.Module:
    tv_name = _TORCHVISION_MODELS[name]
    model = getattr(torchvision.models, tv_name)(weights=None, num_classes=num_classes)
    if tv_name.startswith("resnet"):
        if small_input:
            # Usual CIFAR adaptation: a 3x3 stride-1 stem and no max pool keep 32x32 inputs
            # from shrinking to 8x8 before the first stage.
            model.conv1 = _replace_conv(
                model.conv1, in_channels, kernel_size=3, stride=1, padding=1
            )
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = _replace_conv(model.conv1, in_channels)
    else:  # mobilenet_v2: the stem conv is features[0][0]
        if small_input:
            raise ValueError(
                f"small_input=True is only supported for torchvision ResNets "
                f"({', '.join(n for n in _TORCHVISION_MODELS if 'resnet' in n)}), got name={name!r}"
            )
        if in_channels != 3:
            model.features[0][0] = _replace_conv(model.features[0][0], in_channels)
    return model


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    small_input: bool = False,
) -> nn.Module:
    """Build a freshly initialised (untrained) model by name.

    Args:
        name: one of :func:`available_models`.
        num_classes: size of the classifier output.
        in_channels: channels of the input images (1 for grayscale), or of the input
            sequences for ``"resnet1d"``.
        small_input: torchvision ResNets only: use a 3x3 stride-1 stem and no max pool, for
            32x32-sized inputs. CIFAR-style models are built for small inputs already and
            ignore it.

    Returns:
        The model, in training mode.

    Raises:
        ValueError: unknown ``name``, non-positive ``num_classes`` / ``in_channels``, or
            ``small_input=True`` for a torchvision model other than a ResNet.
        TypeError: ``num_classes`` / ``in_channels`` is not an int, or ``small_input`` not
            a bool.

    Example:
        >>> model = build_model("resnet20", num_classes=100)
    """
    num_classes = check_int("num_classes", num_classes, minimum=1)
    in_channels = check_int("in_channels", in_channels, minimum=1)
    small_input = check_bool("small_input", small_input)
    if name in _CIFAR_MODELS:
        return _CIFAR_MODELS[name](num_classes=num_classes, in_channels=in_channels)
    if name in _TORCHVISION_MODELS:
        return _build_torchvision(name, num_classes, in_channels, small_input)
    raise ValueError(
        f"unknown model name={name!r}; available models: {', '.join(available_models())}"
    )
