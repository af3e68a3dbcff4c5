"""Model zoo in plain PyTorch: CIFAR ResNets (option A), VGG-16-BN, GoogLeNet, a 1-D ResNet for
sequences and torchvision models."""

from __future__ import annotations

from .cifar_resnet import resnet20, resnet32, resnet44, resnet56, resnet110
from .googlenet import googlenet
from .registry import available_models, build_model
from .resnet1d import resnet1d
from .vgg import vgg16_bn

__all__ = [
    "available_models",
    "build_model",
    "googlenet",
    "resnet1d",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg16_bn",
]
