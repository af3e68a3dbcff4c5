"""VGG-16 with BatchNorm, CIFAR variant (one Linear classifier on a 512-d feature)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG", "VGG16_CFG", "vgg16_bn"]

# Integers are conv widths, "M" is a 2x2 max pool.
VGG16_CFG: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]


class VGG(nn.Module):
    """Stack of conv3x3 -> BN -> ReLU layers and max pools, then pool to 1x1 and a Linear."""

    def __init__(self, cfg: list[int | str], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [
                    nn.Conv2d(channels, int(v), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(inplace=True),
                ]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        # A 32x32 input is already 1x1 here; pooling lets larger inputs work unchanged.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's VGG init: Kaiming (fan_out) for convs, unit BN, small-normal Linear.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """VGG-16-BN for CIFAR: 13 conv layers and one Linear(512, num_classes)."""
    return VGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels)
