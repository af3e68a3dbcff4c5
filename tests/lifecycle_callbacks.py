"""Callbacks the lifecycle tests add to the *shipped* configs with
``+callbacks.<name>._target_=lifecycle_callbacks.<Class>``: they stop a real ``lrpet-train``
process at a chosen point, save a checkpoint after the decomposition, or make the run dir
unwritable at fit end. Test support only: nothing here is part of the package."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lrpet_lightning.core import transforms

__all__ = ["UNWRITABLE", "ReadOnlyAtFitEnd", "SaveAfterFit", "WaitAt"]

#: Run dirs that ``ReadOnlyAtFitEnd`` declared unwritable (the test's patched ``open``
#: refuses writes below them).
UNWRITABLE: set[Path] = set()


def _block(trainer: pl.Trainer) -> None:
    """Wait until Lightning saw SIGTERM or the process is killed; exit 3 when neither comes."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not trainer.received_sigterm:
        time.sleep(0.01)
    if not trainer.received_sigterm:
        sys.exit(3)  # no signal came: fail loudly


class WaitAt(pl.Callback):
    """Writes ``<marker>.<step>`` and blocks at the start of the batch reaching global step
    ``step``; and writes ``<marker>.projection<epoch>`` and blocks *inside* the projection
    at the end of epoch ``epoch`` (in ``project_epochs``), after ``after_layers`` layers
    were solved and before any is written. Each marker blocks once: a relaunch with the
    same command goes past it.

    Args:
        steps: global steps to block at (mid-epoch).
        marker: path prefix of the marker files.
        project_epochs: epochs whose epoch-end projection blocks.
        after_layers: layers solved before the projection blocks.
    """

    def __init__(self, steps: Sequence[int], marker: str, project_epochs: Sequence[int] = (),
                 after_layers: int = 5) -> None:
        self.steps, self.marker = list(steps), marker
        self.project_epochs, self.after_layers = list(project_epochs), after_layers
        self._trainer: pl.Trainer | None = None
        self._solved = 0
        solve = transforms._project_with_fallbacks

        def blocking(*args: Any, **kwargs: Any) -> Any:
            trainer = self._trainer
            if trainer is not None and trainer.current_epoch in self.project_epochs:
                self._solved += 1
                marker = f"{self.marker}.projection{trainer.current_epoch}"
                if self._solved > self.after_layers and not os.path.exists(marker):
                    open(marker, "w").close()
                    _block(trainer)
            return solve(*args, **kwargs)

        transforms._project_with_fallbacks = blocking  # a fresh process per launch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer, self._solved = trainer, 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        marker = f"{self.marker}.{trainer.global_step}"
        if trainer.global_step not in self.steps or os.path.exists(marker):
            return
        open(marker, "w").close()
        _block(trainer)


class SaveAfterFit(pl.Callback):
    """Saves ``checkpoints/last.ckpt`` at the very end of the fit, after the LRPET callback
    decomposed the model (it comes after it in the callbacks list), as a ``ModelCheckpoint``
    saving on ``on_train_end`` would: a checkpoint of the thin model."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(os.path.join(self.dirpath, "last.ckpt"))


class ReadOnlyAtFitEnd(pl.Callback):
    """Declares ``path`` unwritable at the end of the last training epoch: after the last
    checkpoint, before the fit-end work (final projection, report, decomposition) and
    everything the app writes afterwards."""

    def __init__(self, path: str) -> None:
        self.path = Path(path).resolve()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1:
            UNWRITABLE.add(self.path)
