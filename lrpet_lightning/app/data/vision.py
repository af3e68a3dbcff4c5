"""Datamodules over torchvision datasets: CIFAR-10/100, an ImageNet folder tree, FakeData.

torchvision is imported when the data are opened, not when the classes are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import Dataset

from lrpet_lightning.app.data.base import ImageDataModule, Transformed
from lrpet_lightning.core.checks import check_bool, check_choice, check_int

__all__ = ["CIFARDataModule", "FakeDataModule", "ImageNetDataModule"]

# The usual per-channel mean and std of each training set.
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CIFARDataModule(ImageDataModule):
    """CIFAR-10 or CIFAR-100 with RandomCrop(32, 4) + horizontal flip (the paper's recipe).

    Validation is ``val_size`` images held out of the official train set (un-augmented).
    ``val_size=0`` trains on all 50,000 images and validates on the official **test** set,
    as the paper's reference code does: ``val/acc`` is then test accuracy, and ``setup``
    warns so (nothing selected on it, a best checkpoint or a sweep, is a fair estimate).
    Test is always the official test set.

    Args:
        root: folder holding ``cifar-10-batches-py`` or ``cifar-100-python``.
        name: ``"cifar10"`` or ``"cifar100"``.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        download: fetch the archive into ``root`` in ``prepare_data`` if it is missing.
        val_size: images held out of the 50,000 training images (0: validate on the test
            set, with a warning).
        split_seed: seed of the held-out split.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an out-of-range argument (``val_size`` is checked against the train
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
        self.name = check_choice("name", name, sorted(CIFAR_STATS))
        self.val_size = check_int("val_size", val_size, minimum=0)
        self.root = Path(root).expanduser()
        self.download = check_bool("download", download)
        self.split_seed = check_int("split_seed", split_seed)
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
        self.train_set = Transformed(train_full, order[self.val_size:], train_tf)
        if self.val_size == 0:  # the reference code's setting: said loudly, never silently
            rank_zero_warn(f"{self.name}: val_size=0 validates on the official TEST set (as "
                           "the paper's reference code): val/acc is test accuracy, so a best "
                           "checkpoint or a sweep selected on it is not a fair estimate; "
                           "hold out training images with data.val_size=5000")
            self.val_set = self.test_set
        else:
            self.val_set = Transformed(train_full, order[: self.val_size], eval_tf)

    def _open(self, train: bool, transform: Any) -> Dataset:
        try:
            return self._dataset_cls()(self.root, train=train, transform=transform)
        except RuntimeError as err:  # torchvision's md5 check failed: a partial extraction
            raise RuntimeError(
                f"{self.root / self._dataset_cls().base_folder} is incomplete or corrupted; "
                "extract the archive again or pass data.download=true"
            ) from err


class ImageNetDataModule(ImageDataModule):
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
        TypeError: an argument of the wrong type.
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
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
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


class FakeDataModule(ImageDataModule):
    """Random images from torchvision ``FakeData``; each split has its own fixed seed.

    Args:
        num_samples: images in each of the train, val and test splits.
        image_size: side of the square images.
        num_classes: number of labels.
        in_channels: image channels (1 or 3).
        batch_size: samples per batch.
        num_workers: DataLoader workers.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an out-of-range argument.
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
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.in_channels = check_choice("in_channels", in_channels, (1, 3))

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
