"""LightningCLI with the LRPET callback: no code change, the callback is chosen on the command line.

Run from a clone:

    python examples/cli.py fit --trainer.max_epochs=5 \
        --trainer.callbacks+=lrpet_lightning.LowRankProjectionCallback \
        --trainer.callbacks.rank_ratio=0.25 --trainer.callbacks.decompose_on_fit_end=true

A small CNN on scikit-learn's bundled 8x8 digits (``DigitsDataModule``, no download).
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn

from lrpet_lightning.app.data import DigitsDataModule


class DigitsCNN(L.LightningModule):
    """A plain LightningModule: nothing LRPET-specific in it."""

    def __init__(self, width: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                      batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


def main() -> None:
    LightningCLI(DigitsCNN, DigitsDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
