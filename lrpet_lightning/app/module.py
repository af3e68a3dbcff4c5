"""``ImageClassifier``: the LightningModule the training app wraps around any image model."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)
from torchmetrics.classification import MulticlassAccuracy

from lrpet_lightning.core.checks import check_bool, check_choice, check_float, check_int

__all__ = ["SCHEDULERS", "ImageClassifier"]

SCHEDULERS = ("multistep", "cosine", "none")


def _epochs(name: str, value: Any) -> list[int]:
    """``value`` as a list of int epochs (Hydra's ListConfig too)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of int epochs, got {value!r} "
                        f"({type(value).__name__})")
    epochs = list(value)
    for epoch in epochs:
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise TypeError(f"{name} must be a list of int epochs, got {epochs!r}")
    return epochs


class ImageClassifier(L.LightningModule):
    """Cross-entropy classification with SGD, as in the paper's reference recipes.

    Logs ``train/loss``, ``train/acc``, ``{val,test}/loss``, ``{val,test}/acc`` and
    ``{val,test}/acc_top5``. Accuracies are plain (micro-averaged) top-k accuracies.

    Args:
        model: the network; ``forward`` delegates to it. Not saved in ``hparams``.
        num_classes: number of labels (>= 2).
        lr: SGD learning rate (> 0).
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 penalty (>= 0), applied to every parameter like the reference code.
        nesterov: Nesterov momentum (needs momentum > 0).
        scheduler: ``"multistep"`` (divide by ``1/gamma`` at ``milestones``), ``"cosine"``
            (to zero over ``max_epochs``) or ``"none"``; stepped once per epoch.
        milestones: epochs at which ``"multistep"`` multiplies the lr by ``gamma``.
        gamma: multiplicative lr drop in (0, 1].
        max_epochs: cosine period; ``None`` uses ``trainer.max_epochs``.
        warmup_epochs: epochs of linear lr warm-up before the scheduler (0 = none); the
            milestones and the cosine period stay counted from epoch 0.
        label_smoothing: cross-entropy label smoothing in [0, 1).

    Raises:
        TypeError: an argument of the wrong type (e.g. ``lr="0.1"``), each named.
        ValueError: an out-of-range argument or an unknown scheduler.

    Example:
        >>> clf = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), num_classes=10)
        >>> clf(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
        scheduler: str = "multistep",
        milestones: Sequence[int] = (200, 300),
        gamma: float = 0.1,
        max_epochs: int | None = None,
        warmup_epochs: int = 0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # Types first, each with its name: a string from an override (optim.lr=abc) must
        # not reach a comparison that fails with a bare TypeError naming nothing.
        check_int("num_classes", num_classes, minimum=2)
        check_float("lr", lr, low=0, low_open=True)
        check_float("momentum", momentum, low=0, high=1, high_open=True)
        check_float("weight_decay", weight_decay, low=0)
        check_bool("nesterov", nesterov)
        if not isinstance(scheduler, str):
            raise TypeError(f"scheduler must be one of {', '.join(map(repr, SCHEDULERS))}, "
                            f"got {scheduler!r} ({type(scheduler).__name__})")
        check_choice("scheduler", scheduler, SCHEDULERS)
        milestones = _epochs("milestones", milestones)
        check_float("gamma", gamma, low=0, high=1, low_open=True)
        check_int("max_epochs", max_epochs, minimum=1, optional=True)
        check_int("warmup_epochs", warmup_epochs, minimum=0)
        check_float("label_smoothing", label_smoothing, low=0, high=1, high_open=True)
        if nesterov and momentum == 0:
            raise ValueError("nesterov must be False when momentum is 0, got True")
        if not all(a < b for a, b in zip([0, *milestones[:-1]], milestones, strict=True)):
            raise ValueError(f"milestones must be strictly increasing positive epochs, "
                             f"got {milestones!r}")
        if scheduler == "multistep" and not all(m > warmup_epochs for m in milestones):
            raise ValueError(f"milestones must be after the warm-up (> warmup_epochs="
                             f"{warmup_epochs}), got {milestones!r}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        #: ``{"epoch", "step", "loss"}`` of the first non-finite training loss (``loss`` as a
        #: string, "nan" or "inf"), else None.
        self.diverged_at: dict[str, Any] | None = None
        top5 = min(5, num_classes)

        def acc(k: int) -> MulticlassAccuracy:
            # average="micro": the usual "fraction correct", not torchmetrics' per-class mean.
            return MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro")

        self.train_acc = acc(1)
        self.val_acc, self.val_acc_top5 = acc(1), acc(top5)
        self.test_acc, self.test_acc_top5 = acc(1), acc(top5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        return loss, logits, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss, logits, y = self._loss(batch)
        finite = bool(torch.isfinite(loss))
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            # Every rank must skip together: one rank skipping its backward while the others
            # run theirs would leave DDP's gradient all-reduce waiting forever.
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            # Diverged: skip this step (returning None skips backward and the optimizer
            # step, so a NaN gradient never reaches the weights) and stop the fit; the app
            # then records status "diverged" instead of training NaN weights to the end.
            if self.diverged_at is None:
                self.diverged_at = {"epoch": self.current_epoch, "step": self.global_step,
                                    "loss": str(float(loss))}  # "nan": JSON has no NaN
            self.trainer.should_stop = True
            return None
        self.train_acc(logits, y)
        n = y.size(0)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        loss, logits, y = self._loss(batch)
        acc, acc_top5 = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_acc_top5")
        acc(logits, y)
        acc_top5(logits, y)
        kw = dict(on_step=False, on_epoch=True, sync_dist=True, batch_size=y.size(0))
        self.log(f"{stage}/loss", loss, **kw)
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val", **kw)
        self.log(f"{stage}/acc_top5", acc_top5, **kw)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _scheduler(self, optimizer: Optimizer) -> LRScheduler | None:
        hp = self.hparams
        warmup = hp.warmup_epochs
        main: LRScheduler | None = None
        if hp.scheduler == "multistep":
            # After warm-up SequentialLR restarts the main scheduler's clock; shift the
            # milestones so they still count from epoch 0.
            steps = [m - warmup for m in hp.milestones]
            main = MultiStepLR(optimizer, milestones=steps, gamma=hp.gamma)
        elif hp.scheduler == "cosine":
            total = hp.max_epochs or (self.trainer.max_epochs if self._trainer else None)
            if total is None or total < 1:
                raise ValueError(
                    "scheduler='cosine' needs max_epochs (or trainer.max_epochs) >= 1, "
                    f"got {total!r}"
                )
            if warmup >= total:
                raise ValueError(f"warmup_epochs must be < the cosine period ({total} "
                                 f"epochs), got {warmup}")
            main = CosineAnnealingLR(optimizer, T_max=total - warmup)
        if warmup == 0:
            return main
        # Linear ramp: epoch e < warmup runs at lr * (e + 1) / (warmup + 1).
        ramp = LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
        if main is None:
            return ramp
        return SequentialLR(optimizer, [ramp, main], milestones=[warmup])

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum,
                        weight_decay=hp.weight_decay, nesterov=hp.nesterov)
        scheduler = self._scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
