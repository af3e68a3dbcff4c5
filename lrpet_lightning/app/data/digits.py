"""scikit-learn's 8x8 handwritten digits, served from memory (no download)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lrpet_lightning.app.data.base import ImageDataModule, Transformed
from lrpet_lightning.app.sampling import EpochKeyed, EpochShuffle
from lrpet_lightning.core.checks import check_bool, check_float, check_int

__all__ = ["DigitsDataModule"]


def _random_shift(image: torch.Tensor, pad: int = 2,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift a ``(C, H, W)`` image by up to ``pad`` pixels each way (pad, then random crop)."""
    h, w = image.shape[-2:]
    # Replicate rather than zero-pad: after normalization "0" is not the background value.
    padded = F.pad(image[None], [pad] * 4, mode="replicate")[0]
    top, left = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, top : top + h, left : left + w]


def _shift_sample(sample: tuple[torch.Tensor, Any],
                  generator: torch.Generator) -> tuple[torch.Tensor, Any]:
    image, target = sample
    return _random_shift(image, generator=generator), target


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to ``image_size``.

    The split is fixed by ``split_seed`` and stratified; ``val_fraction`` and ``test_fraction``
    are fractions of the whole dataset (the defaults: 270 val, 359 test, 1,168 train images).
    Tensors are built once in ``setup`` and served from memory, so an epoch takes
    milliseconds.

    Args:
        batch_size: samples per batch.
        image_size: side of the square images the 8x8 digits are resized to (bilinear).
        val_fraction: fraction of all samples held out for validation.
        test_fraction: fraction of all samples held out for testing.
        split_seed: seed of the train/val/test split.
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
        augment: random shifts of up to 2 px on the training split.

    Raises:
        TypeError: an argument of the wrong type (e.g. ``image_size="16"``).
        ValueError: an argument out of range, or fractions leaving a split too small to
            hold every class.

    Example:
        >>> dm = DigitsDataModule(image_size=16); dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))[0].shape
        torch.Size([64, 1, 16, 16])
    """

    num_samples = 1797

    @property
    def class_names(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.image_size = check_int("image_size", image_size, minimum=1)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            check_float(name, value, low=0, high=1, low_open=True, high_open=True)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
            )
        self.num_classes = 10
        self.in_channels = 1
        self.n_val = round(val_fraction * self.num_samples)
        self.n_test = round(test_fraction * self.num_samples)
        # A stratified split needs at least one sample of every class in every part.
        for name, n in (("val_fraction", self.n_val), ("test_fraction", self.n_test)):
            if n < self.num_classes:
                raise ValueError(
                    f"{name} leaves {n} samples; a stratified split needs >= {self.num_classes}"
                )
        self.split_seed = check_int("split_seed", split_seed, minimum=0)
        self.augment = check_bool("augment", augment)
        self.mean: float | None = None
        self.std: float | None = None
        self.split_indices: dict[str, Any] = {}

    def _split(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        import numpy as np
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        # Split indices rather than arrays, so the split itself can be inspected and tested.
        rest, test = train_test_split(
            np.arange(len(y)), test_size=self.n_test, stratify=y, random_state=self.split_seed
        )
        train, val = train_test_split(
            rest, test_size=self.n_val, stratify=y[rest], random_state=self.split_seed
        )
        self.split_indices = {"train": train, "val": val, "test": test}
        out = {}
        for name, idx in self.split_indices.items():
            images = torch.as_tensor(x[idx], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
            if self.image_size != 8:
                images = F.interpolate(
                    images, size=(self.image_size,) * 2, mode="bilinear", align_corners=False
                )
            out[name] = (images, torch.as_tensor(y[idx], dtype=torch.long))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # tensors are stage-independent; build them once
            return
        parts = self._split()
        # Bilinear resizing is affine-equivariant, so statistics taken after the resize are
        # exactly those of the tensors the model sees: the train split gets mean 0, std 1.
        train_images = parts["train"][0]
        self.mean, self.std = train_images.mean().item(), train_images.std().item()
        tensors = {k: ((x - self.mean) / self.std, y) for k, (x, y) in parts.items()}
        self.train_set = TensorDataset(*tensors["train"])
        if self.augment:
            self.train_set = Transformed(
                self.train_set, list(range(len(self.train_set))), _random_shift
            )
        self.val_set = TensorDataset(*tensors["val"])
        self.test_set = TensorDataset(*tensors["test"])
        self._plain_train = TensorDataset(*tensors["train"])

    def train_dataloader(self) -> DataLoader:
        """Shuffled and shifted from (seed, epoch, sample) alone, so a run resumed from an
        epoch's checkpoint trains exactly what the uninterrupted run trained (Lightning
        restores neither RNG states nor a plain loader's order). The seed is torch's
        initial seed: the app's ``seed`` after ``seed_everything``."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a loader")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        seed = torch.initial_seed()
        augment = _shift_sample if self.augment else None
        dataset = EpochKeyed(self._plain_train, seed, augment)
        return DataLoader(dataset, batch_size=self.batch_size,
                          sampler=EpochShuffle(dataset, seed, replicas, rank),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
