"""Datamodules: fixed stratified digits split, shapes, normalization, missing-data messages."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lrpet_lightning.app.data import (
    CIFARDataModule,
    DigitsDataModule,
    FakeDataModule,
    ImageNetDataModule,
)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm


def _labels(dataset) -> torch.Tensor:
    return dataset.tensors[1]


# ----------------------------------------------------------------------------- digits
def test_digits_split_sizes_are_fixed(digits: DigitsDataModule) -> None:
    sizes = {k: len(v) for k, v in digits.split_indices.items()}
    # 0.2 * 1797 -> 359 test, 0.15 * 1797 -> 270 val: fractions of the whole dataset.
    assert sizes == {"train": 1168, "val": 270, "test": 359}
    assert (len(digits.train_set), len(digits.val_set), len(digits.test_set)) == (1168, 270, 359)


def test_digits_split_is_disjoint_and_complete(digits: DigitsDataModule) -> None:
    parts = [set(idx.tolist()) for idx in digits.split_indices.values()]
    assert sum(map(len, parts)) == 1797
    assert set().union(*parts) == set(range(1797))


def test_digits_split_is_stratified(digits: DigitsDataModule) -> None:
    all_counts = torch.bincount(
        torch.cat([_labels(s) for s in (digits.train_set, digits.val_set, digits.test_set)]),
        minlength=10,
    ).double()
    for dataset in (digits.train_set, digits.val_set, digits.test_set):
        counts = torch.bincount(_labels(dataset), minlength=10).double()
        assert (counts > 0).all()
        expected = all_counts * len(dataset) / 1797
        assert (counts - expected).abs().max() <= 1.0  # stratified: off by at most one


def test_digits_split_is_reproducible_and_seeded(digits: DigitsDataModule) -> None:
    again = DigitsDataModule()
    again.setup("fit")
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(digits.split_indices[name], again.split_indices[name])
    torch.testing.assert_close(digits.train_set.tensors[0], again.train_set.tensors[0])
    other = DigitsDataModule(split_seed=1)
    other.setup("fit")
    assert set(other.split_indices["test"]) != set(digits.split_indices["test"])


@pytest.mark.parametrize("image_size", [8, 16, 32])
def test_digits_shapes(image_size: int) -> None:
    dm = DigitsDataModule(batch_size=50, image_size=image_size)
    assert (dm.num_classes, dm.in_channels) == (10, 1)  # known before setup
    assert dm.example_input_shape == (1, 1, image_size, image_size)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 1, image_size, image_size) and x.dtype == torch.float32
    assert y.shape == (50,) and y.dtype == torch.long
    assert next(iter(dm.test_dataloader()))[0].shape[1:] == (1, image_size, image_size)


def test_digits_normalization_uses_train_stats(digits: DigitsDataModule) -> None:
    train = digits.train_set.tensors[0]
    torch.testing.assert_close(train.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(), torch.tensor(1.0), atol=1e-5, rtol=0)
    # The other splits reuse the train statistics, so they are only approximately standard.
    val = digits.val_set.tensors[0]
    assert abs(val.mean().item()) < 0.1 and abs(val.std().item() - 1) < 0.1
    # Pixels 0..16 were scaled to [0, 1] before the statistics were taken.
    assert 0.0 < digits.mean < 1.0 and 0.0 < digits.std < 1.0
    lo = (0.0 - digits.mean) / digits.std
    assert train.min().item() == pytest.approx(lo, abs=1e-5)


def test_digits_augment_shifts_train_only() -> None:
    plain, shifted = DigitsDataModule(image_size=16), DigitsDataModule(image_size=16, augment=True)
    plain.setup("fit")
    shifted.setup("fit")
    torch.manual_seed(0)
    moved = sum(
        not torch.equal(shifted.train_set[i][0], plain.train_set[i][0]) for i in range(20)
    )
    assert moved > 10  # 24 of 25 offsets move the image
    x, y = shifted.train_set[0]
    assert x.shape == (1, 16, 16) and y == plain.train_set[0][1]
    torch.testing.assert_close(shifted.val_set.tensors[0], plain.val_set.tensors[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"image_size": 0}, "image_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_fraction": 0.0}, r"val_fraction must be a number in \(0, 1\)"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
        ({"val_fraction": 0.001}, "stratified split needs >= 10"),
    ],
)
def test_digits_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": "64"}, r"batch_size must be an int >= 1, got '64' \(str\)"),
        ({"image_size": 16.0}, "image_size must be an int"),
        ({"val_fraction": "0.1"}, "val_fraction must be a number in"),
        ({"augment": "yes"}, "augment must be True or False"),
    ],
)
def test_digits_wrong_types_raise_type_error(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        DigitsDataModule(**kwargs)


# ----------------------------------------------------------------------------- fake data
@pytest.mark.parametrize("in_channels", [1, 3])
def test_fake_shapes_and_seeds(in_channels: int) -> None:
    dm = FakeDataModule(num_samples=16, image_size=12, num_classes=4, in_channels=in_channels,
                        batch_size=8)
    assert (dm.num_classes, dm.in_channels) == (4, in_channels)
    assert dm.example_input_shape == (1, in_channels, 12, 12)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, in_channels, 12, 12) and y.shape == (8,)
    assert 0 <= y.min() and y.max() < 4
    assert not torch.equal(dm.train_set[0][0], dm.val_set[0][0])  # splits differ
    again = FakeDataModule(num_samples=16, image_size=12, num_classes=4, in_channels=in_channels)
    again.setup("test")
    torch.testing.assert_close(again.test_set[3][0], dm.test_set[3][0])  # but are fixed


def test_fake_bad_arguments() -> None:
    with pytest.raises(ValueError, match="in_channels must be one of 1, 3, got 2"):
        FakeDataModule(in_channels=2)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        FakeDataModule(num_classes=1)
    with pytest.raises(TypeError, match="num_samples must be an int >= 1"):
        FakeDataModule(num_samples="8")


# ----------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize(("name", "folder"), [("cifar10", "cifar-10-batches-py"),
                                              ("cifar100", "cifar-100-python")])
def test_cifar_missing_data_message(tmp_path: Path, name: str, folder: str) -> None:
    dm = CIFARDataModule(tmp_path, name=name, download=False)
    assert (dm.num_classes, dm.in_channels) == ((10 if name == "cifar10" else 100), 3)
    assert dm.example_input_shape == (1, 3, 32, 32)
    for call in (dm.prepare_data, lambda: dm.setup("fit")):
        with pytest.raises(FileNotFoundError) as info:
            call()
        message = str(info.value)
        assert str(tmp_path) in message and folder in message
        assert "data.download=true" in message


def test_cifar_corrupted_folder_message(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(RuntimeError, match="incomplete or corrupted.*data.download=true"):
        CIFARDataModule(tmp_path).setup("fit")


def _write_fake_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    files = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": n_test}
    for file_name, n in files.items():
        entry = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        (folder / file_name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))


def test_cifar_split_and_transforms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as cifar

    _write_fake_cifar10(tmp_path)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # fake md5s
    dm = CIFARDataModule(tmp_path, batch_size=4, num_workers=0, val_size=5)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 6)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    # val is not augmented: the same image twice gives the same tensor.
    torch.testing.assert_close(dm.val_set[0][0], dm.val_set[0][0])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)
    again = CIFARDataModule(tmp_path, val_size=5)
    again.setup("fit")
    assert again.val_set.indices == dm.val_set.indices  # fixed by split_seed
    with pytest.raises(ValueError, match="val_size must be < 20"):
        CIFARDataModule(tmp_path, val_size=20).setup("fit")
    no_val = CIFARDataModule(tmp_path, val_size=0)
    with pytest.warns(UserWarning, match="val_size=0 validates on the official TEST set"):
        no_val.setup("fit")  # the reference code's setting: never silent
    assert no_val.val_set is no_val.test_set and len(no_val.train_set) == 20


def test_cifar_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("name must be one of 'cifar10', 'cifar100'")):
        CIFARDataModule(tmp_path, name="cifar5")
    with pytest.raises(ValueError, match="val_size must be an int >= 0, got -1"):
        CIFARDataModule(tmp_path, val_size=-1)
    with pytest.raises(TypeError, match="val_size must be an int >= 0, got '5000'"):
        CIFARDataModule(tmp_path, val_size="5000")
    with pytest.raises(TypeError, match="download must be True or False"):
        CIFARDataModule(tmp_path, download="no")


# ----------------------------------------------------------------------------- ImageNet
def test_imagenet_missing_paths(tmp_path: Path) -> None:
    dm = ImageNetDataModule(tmp_path, num_workers=0)
    assert (dm.num_classes, dm.in_channels, dm.example_input_shape) == (1000, 3, (1, 3, 224, 224))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "train") in message
    assert "train/<class>/*.JPEG" in message and "val/<class>/*.JPEG" in message
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "val"))):
        dm.setup("fit")


def test_imagenet_folder_tree(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (i * 90, 10, 200)).save(
                    tmp_path / split / cls / f"{i}.JPEG")
    dm = ImageNetDataModule(tmp_path, batch_size=3, num_workers=0, image_size=16, num_classes=2)
    dm.setup("fit")
    assert dm.test_set is dm.val_set and len(dm.train_set) == 4
    assert next(iter(dm.train_dataloader()))[0].shape == (3, 3, 16, 16)
    assert next(iter(dm.val_dataloader()))[0].shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="num_classes is 1000 but .* holds 2 class folders"):
        ImageNetDataModule(tmp_path, num_workers=0).setup("test")
