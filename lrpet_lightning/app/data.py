"""LightningDataModules for the training app.

Every datamodule sets ``num_classes``, ``in_channels`` and ``example_input_shape`` in
``__init__``, because the app builds the model (and the callback its example inputs) before
``setup`` runs.

- :class:`DigitsDataModule` — scikit-learn's bundled 8x8 digits; no download, seconds to train.
- :class:`CIFARDataModule` — CIFAR-10/100 with the paper's crop+flip recipe.
- :class:`ImageNetDataModule` — an ``ImageFolder`` tree with ``train/`` and ``val/``.
- :class:`FakeDataModule` — random images of any shape, for smoke tests.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lrpet_lightning.app.sampling import EpochKeyed, EpochShuffle

__all__ = ["CIFARDataModule", "DigitsDataModule", "FakeDataModule", "ImageNetDataModule"]

# The usual per-channel mean and std of each training set.
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class _ImageDataModule(L.LightningDataModule):
    """Shared loader plumbing: argument checks, loaders and ``example_input_shape``."""

    num_classes: int
    in_channels: int
    image_size: int

    def __init__(self, batch_size: int, num_workers: int, pin_memory: bool = False) -> None:
        super().__init__()
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_workers = _check_int("num_workers", num_workers, 0)
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


class _Transformed(Dataset):
    """The samples ``indices`` of ``dataset`` with an image ``transform`` of their own."""

    def __init__(self, dataset: Dataset, indices: list[int], transform: Any) -> None:
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[self.indices[index]]
        return self.transform(image), target


class DigitsDataModule(_ImageDataModule):
    """scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to ``image_size``.

    The split is fixed by ``split_seed`` and stratified; ``val_fraction`` and ``test_fraction``
    are fractions of the whole dataset. Tensors are built once in ``setup`` and served from
    memory, so an epoch takes milliseconds.

    Args:
        batch_size: samples per batch.
        image_size: side of the square images the 8x8 digits are resized to (bilinear).
        val_fraction: fraction of all samples held out for validation.
        test_fraction: fraction of all samples held out for testing.
        split_seed: seed of the train/val/test split.
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
        augment: random shifts of up to 2 px on the training split.

    Raises:
        ValueError: on an out-of-range argument.

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
        self.image_size = _check_int("image_size", image_size, 1)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
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
        self.split_seed = split_seed
        self.augment = augment
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
            self.train_set = _Transformed(
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


class CIFARDataModule(_ImageDataModule):
    """CIFAR-10 or CIFAR-100 with RandomCrop(32, 4) + horizontal flip (the paper's recipe).

    Validation is ``val_size`` images held out of the official train set (un-augmented);
    ``val_size=0`` validates on the official test set instead, as the reference code does.
    Test is always the official test set.

    Args:
        root: folder holding ``cifar-10-batches-py`` or ``cifar-100-python``.
        name: ``"cifar10"`` or ``"cifar100"``.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        download: fetch the archive into ``root`` in ``prepare_data`` if it is missing.
        val_size: images held out of the 50,000 training images.
        split_seed: seed of the held-out split.

    Raises:
        ValueError: on an out-of-range argument (``val_size`` is checked against the train
            set in ``setup``).
        FileNotFoundError: in ``prepare_data``/``setup`` when the data are missing and
            ``download`` is false.
    """

    def __init__(
        self,
        root: str | Path,
        name: str = "cifar10",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = False,
        val_size: int = 5000,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory=True)
        if name not in CIFAR_STATS:
            raise ValueError(f"name must be one of {sorted(CIFAR_STATS)}, got {name!r}")
        self.val_size = _check_int("val_size", val_size, 0)
        self.root = Path(root).expanduser()
        self.name = name
        self.download = download
        self.split_seed = split_seed
        self.num_classes = 10 if name == "cifar10" else 100
        self.in_channels = 3
        self.image_size = 32

    def _dataset_cls(self) -> type:
        from torchvision import datasets

        return datasets.CIFAR10 if self.name == "cifar10" else datasets.CIFAR100

    def _check_exists(self) -> None:
        folder = self.root / self._dataset_cls().base_folder
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{self.name} not found: expected the extracted folder {folder} under root "
                f"{self.root}. Pass data.download=true (Hydra override) to download it, or put "
                f"the extracted '{folder.name}' folder there."
            )

    def _transforms(self) -> tuple[Any, Any]:
        from torchvision import transforms as T

        normalize = T.Normalize(*CIFAR_STATS[self.name])
        train = T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
        )
        return train, T.Compose([T.ToTensor(), normalize])

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node, so downloads never race.
        if self.download:
            cls = self._dataset_cls()
            cls(self.root, train=True, download=True)
            cls(self.root, train=False, download=True)
        else:
            self._check_exists()

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        self._check_exists()
        train_tf, eval_tf = self._transforms()
        self.test_set = self._open(train=False, transform=eval_tf)
        # One copy of the images in memory, two views: the held-out part is not augmented.
        train_full = self._open(train=True, transform=None)
        n = len(train_full)
        if self.val_size >= n:
            raise ValueError(f"val_size must be < {n} (the train set), got {self.val_size}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        order = order.tolist()
        self.train_set = _Transformed(train_full, order[self.val_size:], train_tf)
        if self.val_size == 0:  # validate on the official test set, like the reference code
            self.val_set = self.test_set
        else:
            self.val_set = _Transformed(train_full, order[: self.val_size], eval_tf)

    def _open(self, train: bool, transform: Any) -> Dataset:
        try:
            return self._dataset_cls()(self.root, train=train, transform=transform)
        except RuntimeError as err:  # torchvision's md5 check failed: a partial extraction
            raise RuntimeError(
                f"{self.root / self._dataset_cls().base_folder} is incomplete or corrupted; "
                "extract the archive again or pass data.download=true"
            ) from err


class ImageNetDataModule(_ImageDataModule):
    """ImageNet (or any subset) from an ``ImageFolder`` tree; test is the val split.

    Expects ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``. Lightning adds the
    DistributedSampler under DDP, so none is created here.

    Args:
        root: folder holding ``train/`` and ``val/``.
        batch_size: samples per batch and per device.
        num_workers: DataLoader workers per device.
        image_size: training crop; evaluation resizes to ``image_size * 256 / 224`` then
            centre-crops ``image_size``.
        num_classes: classes in the tree (checked against the folders in ``setup``).

    Raises:
        ValueError: on an out-of-range argument, or a class count that differs from the tree.
        FileNotFoundError: in ``setup`` when ``root/train`` or ``root/val`` is missing.
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        num_classes: int = 1000,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory=True)
        self.root = Path(root).expanduser()
        self.image_size = _check_int("image_size", image_size, 1)
        self.num_classes = _check_int("num_classes", num_classes, 2)
        self.in_channels = 3

    def _folder(self, split: str) -> Path:
        path = self.root / split
        if not path.is_dir():
            raise FileNotFoundError(
                f"ImageNet split folder missing: {path}. Expected layout: "
                f"{self.root}/train/<class>/*.JPEG and {self.root}/val/<class>/*.JPEG"
            )
        return path

    def _image_folder(self, split: str, transform: Any) -> Dataset:
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(self._folder(split), transform=transform)
        if len(dataset.classes) != self.num_classes:
            raise ValueError(
                f"num_classes is {self.num_classes} but {self.root / split} holds "
                f"{len(dataset.classes)} class folders; set data.num_classes to match"
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        from torchvision import transforms as T

        normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        eval_tf = T.Compose([
            T.Resize(int(self.image_size * 256 / 224)),
            T.CenterCrop(self.image_size),
            T.ToTensor(),
            normalize,
        ])
        train_tf = T.Compose([
            T.RandomResizedCrop(self.image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize,
        ])
        fit = stage in (None, "fit")
        # Check both folders before the (slow) directory scans, so a typo fails fast.
        if fit:
            self._folder("train")
        self._folder("val")
        if fit and self.train_set is None:
            self.train_set = self._image_folder("train", train_tf)
        if self.val_set is None:
            self.val_set = self.test_set = self._image_folder("val", eval_tf)


class FakeDataModule(_ImageDataModule):
    """Random images from torchvision ``FakeData``; each split has its own fixed seed.

    Args:
        num_samples: images in each of the train, val and test splits.
        image_size: side of the square images.
        num_classes: number of labels.
        in_channels: image channels (1 or 3).
        batch_size: samples per batch.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        num_samples: int = 256,
        image_size: int = 32,
        num_classes: int = 10,
        in_channels: int = 3,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.image_size = _check_int("image_size", image_size, 1)
        self.num_classes = _check_int("num_classes", num_classes, 2)
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        self.in_channels = in_channels

    def setup(self, stage: str | None = None) -> None:
        from torchvision import transforms as T
        from torchvision.datasets import FakeData

        def split(offset: int) -> Dataset:
            # FakeData seeds sample i with i + random_offset: disjoint offsets, distinct splits.
            return FakeData(
                size=self.num_samples,
                image_size=(self.in_channels, self.image_size, self.image_size),
                num_classes=self.num_classes,
                transform=T.ToTensor(),
                random_offset=offset,
            )

        self.train_set, self.val_set, self.test_set = (
            split(0), split(self.num_samples), split(2 * self.num_samples)
        )
