"""What every datamodule of the app shares: argument checks, loaders, the input shape, and
a dataset view with a transform of its own."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lrpet_lightning.core.checks import check_int

__all__ = ["ImageDataModule", "Transformed"]


class ImageDataModule(L.LightningDataModule):
    """Shared loader plumbing: argument checks, loaders and ``example_input_shape``.

    Raises:
        TypeError: ``batch_size`` or ``num_workers`` is not an int.
        ValueError: ``batch_size < 1`` or ``num_workers < 0``.
    """

    num_classes: int
    in_channels: int
    image_size: int

    def __init__(self, batch_size: int, num_workers: int, pin_memory: bool = False) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def class_names(self) -> list[str] | None:
        """The label names, index by index (None where the data do not name them, or before
        ``setup`` for folder-based sets)."""
        classes = getattr(self.test_set, "classes", None)
        return list(classes) if classes is not None else None

    @property
    def example_input_shape(self) -> tuple[int, int, int, int]:
        """Shape of one input batch of size 1: ``(1, C, H, W)``."""
        return (1, self.in_channels, self.image_size, self.image_size)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a loader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            # Pinning only helps host-to-GPU copies; without CUDA it would only warn.
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class Transformed(Dataset):
    """The samples ``indices`` of ``dataset`` with an image ``transform`` of their own."""

    def __init__(self, dataset: Dataset, indices: list[int], transform: Any) -> None:
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[self.indices[index]]
        return self.transform(image), target
