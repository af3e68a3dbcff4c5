"""A small 1-D ResNet for ``(N, C, L)`` sequences (MNIST-1D and the like).

Built as the CIFAR ResNets of :mod:`~lrpet_lightning.models.cifar_resnet`, with ``Conv1d``
and ``BatchNorm1d``: a kernel-3 stem, three stages of ``n`` basic blocks at ``width``,
``2 * width`` and ``4 * width`` channels (the last two halve the length), global average
pooling and one Linear layer. Depth is ``6n + 2``. Downsampling shortcuts have no parameters
(subsampling plus zero channel padding, "option A"), so every Conv1d sits on a residual
branch, is followed by its own BatchNorm1d, and is a candidate for low-rank projection with
BN rectification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrpet_lightning.core.checks import check_int

__all__ = ["BasicBlock1d", "ResNet1d", "resnet1d"]


class PadShortcut1d(nn.Module):
    """Option A shortcut: subsample the length by 2 and zero-pad the channel dimension.

    A module rather than a lambda so models stay picklable and ``deepcopy``-able.
    """

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.pad pads dims from the last backwards: (L, L, C, C).
        p = self.pad_channels
        return F.pad(x[:, :, ::2], (0, 0, p, p))

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad_channels}"


class BasicBlock1d(nn.Module):
    """Two kernel-3 Conv1d -> BatchNorm1d layers, a ReLU between them and after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(planes)
        self.conv2 = nn.Conv1d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # Stages only ever double the width (and halve the length), so padding
            # planes // 4 channels on each side takes in_planes = planes / 2 up to planes.
            self.shortcut = PadShortcut1d(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet1d(nn.Module):
    """1-D ResNet with ``num_blocks[i]`` basic blocks in stage ``i``.

    Args:
        num_blocks: blocks in each of the three stages.
        num_classes: size of the classifier output.
        in_channels: channels of the input sequences.
        width: channels of the first stage (the others: ``2 * width``, ``4 * width``); a
            multiple of 2, so the option A shortcut can pad ``width / 2`` channels each side.

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range.
    """

    def __init__(self, num_blocks: tuple[int, int, int] | list[int], num_classes: int = 10,
                 in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        if len(num_blocks) != 3:
            raise ValueError(f"num_blocks must be 3 block counts (one per stage), "
                             f"got {num_blocks!r}")
        for i, n in enumerate(num_blocks):
            check_int(f"num_blocks[{i}]", n, minimum=1)
        check_int("width", width, minimum=2)
        if width % 2:
            raise ValueError(f"width must be an even int >= 2 (option A shortcuts pad half of "
                             f"it on each side), got {width}")
        widths = (width, 2 * width, 4 * width)
        self.in_planes = width
        self.conv1 = nn.Conv1d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.layer1 = self._make_layer(widths[0], num_blocks[0], stride=1)
        self.layer2 = self._make_layer(widths[1], num_blocks[1], stride=2)
        self.layer3 = self._make_layer(widths[2], num_blocks[2], stride=2)
        self.linear = nn.Linear(widths[2], num_classes)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock1d(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # As the CIFAR ResNets: Kaiming normal (fan_in) on conv and linear weights; BN and
        # the linear bias keep PyTorch defaults.
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool1d(out, 1).flatten(1)
        return self.linear(out)


def resnet1d(num_classes: int = 10, in_channels: int = 1, width: int = 32,
             depth: int = 14) -> nn.Module:
    """1-D ResNet-``depth`` (``depth = 6n + 2``; the default, n=2 at widths 32/64/128, has
    230,570 parameters for 10 classes and 6.15 MFLOPs on one length-40 sequence).

    Raises:
        TypeError, ValueError: ``depth`` is not ``6n + 2`` for some ``n >= 1``, or another
            argument is out of range.

    Example:
        >>> model = resnet1d(num_classes=10, in_channels=1)
        >>> model(torch.randn(2, 1, 40)).shape
        torch.Size([2, 10])
    """
    check_int("depth", depth, minimum=8)
    if (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 for some n >= 1 (8, 14, 20, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNet1d([n, n, n], num_classes=num_classes, in_channels=in_channels, width=width)
