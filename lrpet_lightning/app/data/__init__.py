"""LightningDataModules for the training app.

Every datamodule sets ``num_classes``, ``in_channels`` and ``example_input_shape`` in
``__init__``, because the app builds the model (and the callback its example inputs) before
``setup`` runs.

- :class:`DigitsDataModule` — scikit-learn's bundled 8x8 digits; no download, seconds to train.
- :class:`MNIST1DDataModule` — MNIST-1D's length-40 sequences, generated in memory (the
  ``mnist1d`` extra); no download, an unsaturated benchmark that trains in minutes on CPU.
- :class:`CIFARDataModule` — CIFAR-10/100 with the paper's crop+flip recipe.
- :class:`ImageNetDataModule` — an ``ImageFolder`` tree with ``train/`` and ``val/``.
- :class:`FakeDataModule` — random images of any shape, for smoke tests.

The classes live in :mod:`~lrpet_lightning.app.data.digits` and
:mod:`~lrpet_lightning.app.data.mnist1d` (in-memory tensors) and
:mod:`~lrpet_lightning.app.data.vision` (torchvision datasets); import them from here, as
the configs' ``_target_`` (``lrpet_lightning.app.data.DigitsDataModule``) does.
"""

from __future__ import annotations

from lrpet_lightning.app.data.digits import DigitsDataModule
from lrpet_lightning.app.data.mnist1d import MNIST1DDataModule
from lrpet_lightning.app.data.vision import CIFARDataModule, FakeDataModule, ImageNetDataModule

__all__ = ["CIFARDataModule", "DigitsDataModule", "FakeDataModule", "ImageNetDataModule",
           "MNIST1DDataModule"]
