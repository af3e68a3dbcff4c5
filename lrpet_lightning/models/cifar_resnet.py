"""CIFAR ResNets of He et al. (2016), option A shortcuts.

Depth is ``6n + 2``: a 3x3 stem, three stages of ``n`` BasicBlocks with 16/32/64 channels,
global average pooling and one Linear layer. Downsampling shortcuts have no parameters
(spatial subsampling plus zero channel padding), so every Conv2d in these models sits on a
residual branch and is a candidate for low-rank projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by 2 spatially and zero-pad the channel dimension.

    A module rather than a lambda so models stay picklable and ``deepcopy``-able.
    """

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.pad pads dims from the last backwards: (W, W, H, H, C, C).
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad_channels}"


class BasicBlock(nn.Module):
    """Two 3x3 conv -> BN layers with a ReLU between them and after the residual sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # Stages only ever double the width, so padding planes // 4 on each side of the
            # channel dim takes in_planes = planes / 2 up to planes.
            self.shortcut = PadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``num_blocks[i]`` BasicBlocks in stage ``i``."""

    def __init__(
        self, num_blocks: list[int], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.linear = nn.Linear(64, num_classes)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # Same as the reference (akamaster/pytorch_resnet_cifar10): Kaiming normal (fan_in)
        # on conv and linear weights; BN and the linear bias keep PyTorch defaults.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # Adaptive pooling (not a fixed 8x8 kernel) so other input sizes also work.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _resnet(depth: int, num_classes: int, in_channels: int) -> CifarResNet:
    n = (depth - 2) // 6
    return CifarResNet([n, n, n], num_classes=num_classes, in_channels=in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-20 (n=3, ~0.27M parameters for 10 classes)."""
    return _resnet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-32 (n=5, ~0.46M parameters for 10 classes)."""
    return _resnet(32, num_classes, in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-44 (n=7, ~0.66M parameters for 10 classes)."""
    return _resnet(44, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-56 (n=9, 853,018 parameters for 10 classes)."""
    return _resnet(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-110 (n=18, ~1.7M parameters for 10 classes)."""
    return _resnet(110, num_classes, in_channels)
