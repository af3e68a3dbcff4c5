"""GoogLeNet, the common CIFAR variant: a 192-channel 3x3 pre-layer, then Inception blocks
a3, b3, max pool, a4 ... e4, max pool, a5, b5, global average pool and one Linear.

Every Inception block has four branches concatenated along the channels: a 1x1 conv; 1x1
then 3x3; 1x1 then two 3x3 (a 5x5 receptive field for the cost of two 3x3s); and a 3x3 max
pool then 1x1. Each conv is followed by BatchNorm and ReLU.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GoogLeNet", "Inception", "googlenet"]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    # Convs keep their bias as in the common CIFAR code; BN follows, so it only adds params.
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class Inception(nn.Module):
    """Four parallel branches, concatenated: ``n1x1 + n3x3 + n5x5 + pool_planes`` channels.

    Args:
        in_channels: input channels.
        n1x1: width of the 1x1 branch.
        n3x3red, n3x3: 1x1 reduction and 3x3 width of the 3x3 branch.
        n5x5red, n5x5: 1x1 reduction and width of the two 3x3s of the "5x5" branch.
        pool_planes: width of the 1x1 after the 3x3 max pool.
    """

    def __init__(self, in_channels: int, n1x1: int, n3x3red: int, n3x3: int, n5x5red: int,
                 n5x5: int, pool_planes: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn_relu(in_channels, n1x1, 1))
        self.b2 = nn.Sequential(*_conv_bn_relu(in_channels, n3x3red, 1),
                                *_conv_bn_relu(n3x3red, n3x3, 3))
        self.b3 = nn.Sequential(*_conv_bn_relu(in_channels, n5x5red, 1),
                                *_conv_bn_relu(n5x5red, n5x5, 3),
                                *_conv_bn_relu(n5x5, n5x5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                *_conv_bn_relu(in_channels, pool_planes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


#: (name, in, n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes) of each Inception block.
_BLOCKS = [
    ("a3", 192, 64, 96, 128, 16, 32, 32),
    ("b3", 256, 128, 128, 192, 32, 96, 64),
    ("a4", 480, 192, 96, 208, 16, 48, 64),
    ("b4", 512, 160, 112, 224, 24, 64, 64),
    ("c4", 512, 128, 128, 256, 24, 64, 64),
    ("d4", 512, 112, 144, 288, 32, 64, 64),
    ("e4", 528, 256, 160, 320, 32, 128, 128),
    ("a5", 832, 256, 160, 320, 32, 128, 128),
    ("b5", 832, 384, 192, 384, 48, 128, 128),
]


class GoogLeNet(nn.Module):
    """GoogLeNet for 32x32 inputs: stages at 32x32 (a3, b3), 16x16 (a4-e4) and 8x8 (a5, b5).

    Args:
        num_classes: classifier outputs.
        in_channels: input image channels.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.pre_layers = nn.Sequential(*_conv_bn_relu(in_channels, 192, 3))
        for name, *widths in _BLOCKS:
            setattr(self, name, Inception(*widths))
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b3(self.a3(self.pre_layers(x)))
        x = self.maxpool(x)
        for name in ("a4", "b4", "c4", "d4", "e4"):
            x = getattr(self, name)(x)
        x = self.maxpool(x)
        x = self.b5(self.a5(x))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def googlenet(num_classes: int = 10, in_channels: int = 3) -> GoogLeNet:
    """The CIFAR GoogLeNet (6.2 M parameters for 10 classes).

    Example:
        >>> from lrpet_lightning.models import googlenet
        >>> googlenet(num_classes=10).linear.out_features
        10
    """
    return GoogLeNet(num_classes=num_classes, in_channels=in_channels)
