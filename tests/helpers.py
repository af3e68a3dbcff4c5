"""Test helpers shared by several test files: a tiny conv classifier as a LightningModule
(``Tiny``), a quiet CPU Trainer (``make_trainer``), the numerical rank of every conv, and the
app's shipped configs composed (``compose``) or trimmed to a run of seconds (``TINY_RUN``)."""
from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["CONVS", "RANK", "TINY_RUN", "Net", "ResumableLoader", "Tiny", "compose", "conv_ranks",
           "make_trainer"]

#: Overrides that make the shipped default run (ResNet-20 on digits) train for seconds.
TINY_RUN = ("trainer.max_epochs=1", "+trainer.limit_train_batches=3",
            "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
            "+trainer.enable_progress_bar=false", "~callbacks.progress_bar")


def compose(*overrides: str, return_hydra_config: bool = False) -> Any:
    """``conf/train.yaml`` with ``overrides``, composed as ``lrpet-train`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lrpet_lightning.app.train import config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return hydra_compose("train", overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


RANK = 4  # rank_ratio=0.25 of 16: every conv below has full rank min(16, C*k*k) = 16
CONVS = ("net.conv1", "net.conv2", "net.conv3")


class Net(nn.Module):
    """conv1 -> BN -> ReLU, conv2 -> BN -> ReLU, conv3 (1x1, no BN), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 4)
        self.calls = 0  # forward passes of this very object (a deep copy counts its own)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


class ResumableLoader:
    """Fixed batches in a fixed order, resumable mid-epoch (Lightning's ``_Stateful``): a
    resumed run sees exactly the batches the interrupted one had not seen yet."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self._pos, self._skip = 0, 0

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        start, self._skip = self._skip, 0
        for i in range(start, len(self)):
            self._pos = i + 1
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield self.x[sl], self.y[sl]

    def state_dict(self) -> dict[str, int]:
        return {"pos": self._pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["pos"] % len(self)  # saved after the epoch's last batch: start over


class Tiny(L.LightningModule):
    """A classifier on fixed random 8x8 images: ``n_batches`` training batches of 4."""

    def __init__(self, n_batches: int = 4, lr: float = 0.1, scheduler: bool = False) -> None:
        super().__init__()
        self.net = Net()
        self.n_batches, self.lr, self.scheduler = n_batches, lr, scheduler
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(4 * n_batches, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 4, (4 * n_batches,), generator=g)
        self.val_ranks: list[tuple[bool, dict[str, int]]] = []  # (sanity check?, ranks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.val_ranks.append((self.trainer.sanity_checking, conv_ranks(self)))
        self.log("val_loss", self._loss(batch))
        self.log("val_const", 1.0)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(self.x, self.y, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:8], self.y[:8]), batch_size=8)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def conv_ranks(module: nn.Module, rtol: float = 1e-5) -> dict[str, int]:
    """Numerical rank of every dense conv's weight matrix (rows = output channels)."""
    return {
        name: int(torch.linalg.matrix_rank(m.weight.detach().float().flatten(1), rtol=rtol))
        for name, m in module.named_modules() if isinstance(m, nn.Conv2d)
    }


def make_trainer(callbacks: Any = (), **kwargs: Any) -> L.Trainer:
    kwargs = {"max_epochs": 1, "logger": False, "enable_checkpointing": False,
              "num_sanity_val_steps": 0, "devices": 1, **kwargs}
    return L.Trainer(accelerator="cpu", callbacks=list(callbacks),
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)
