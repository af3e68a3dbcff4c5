"""MNIST-1D (Greydanus & Kobak, ICML 2024): 5,000 procedurally generated length-40 sequences,
built in memory by the ``mnist1d`` package (no download)."""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, TensorDataset

from lrpet_lightning.app.data.base import ImageDataModule
from lrpet_lightning.app.sampling import EpochKeyed, EpochShuffle
from lrpet_lightning.core.checks import check_int

__all__ = ["MNIST1DDataModule"]

#: What ``mnist1d.data.get_dataset_args()`` yields: 4,000 train and 1,000 test sequences.
TRAIN_SIZE, TEST_SIZE, SEQUENCE_LENGTH = 4000, 1000, 40


def _require_mnist1d() -> Any:
    try:
        import mnist1d.data
    except ImportError as err:
        raise ImportError(
            "MNIST1DDataModule needs the mnist1d package, which is not installed; install "
            'it with: pip install "lrpet-lightning[mnist1d]"') from err
    return mnist1d.data


@lru_cache(maxsize=2)
def _generate(dataset_seed: int) -> tuple[np.ndarray, ...]:
    """``(x, y, x_test, y_test)`` of MNIST-1D with the package's default arguments and
    ``dataset_seed``, memoized per process (generating takes ~1.3 s; read-only arrays)."""
    data = _require_mnist1d()
    args = data.get_dataset_args()
    args.seed = dataset_seed
    # make_dataset reseeds Python's and NumPy's global RNGs; a run seeded by
    # seed_everything must not see its streams reset by building the data.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        dataset = data.make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = tuple(np.asarray(dataset[k]) for k in ("x", "y", "x_test", "y_test"))
    for array in arrays:
        array.flags.writeable = False
    return arrays


class MNIST1DDataModule(ImageDataModule):
    """MNIST-1D: 10 classes of length-40 sequences, served from memory as ``(N, 1, 40)``.

    The sequences are generated (not downloaded) by ``mnist1d.data.make_dataset`` with the
    package's default arguments and ``dataset_seed``: 4,000 train and 1,000 test sequences
    (seed 42 gives the published benchmark: logistic regression ~32 %, MLP ~68 %, CNN ~94 %
    test accuracy). Generation takes ~1.3 s, so nothing is cached on disk; the arrays are
    memoized per process. ``val_size`` sequences are held out of the 4,000 for validation
    (split by ``split_seed``); ``val_size=0`` trains on all 4,000 and validates on the
    **test** set, as :class:`~lrpet_lightning.app.data.CIFARDataModule` does, with a warning.
    The test split is always the 1,000 test sequences.

    Inputs are standardized with one mean and one standard deviation measured on the training
    split only (after the held-out part is removed), so the training split has mean 0 and
    std 1 and validation and test sequences are shifted and scaled alike. (``make_dataset``
    itself already centres and scales all 5,000 sequences, test ones included, by one affine
    map; the standardization here re-fixes that map from the training split alone.)

    Args:
        batch_size: sequences per batch.
        val_size: sequences held out of the 4,000 training ones for validation (0: validate
            on the test set, with a warning).
        split_seed: seed of the held-out split.
        dataset_seed: seed of the generation (42: the published MNIST-1D).
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).

    Raises:
        ImportError: the ``mnist1d`` package is not installed (the ``mnist1d`` extra).
        TypeError: an argument of the wrong type (e.g. ``val_size=0.1``).
        ValueError: an argument out of range (e.g. ``val_size=4000``).

    Example:
        >>> dm = MNIST1DDataModule(batch_size=128); dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))[0].shape
        torch.Size([128, 1, 40])
    """

    sequence_length = SEQUENCE_LENGTH

    @property
    def class_names(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    @property
    def example_input_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        """Shape of one input batch of size 1: ``(1, 1, 40)``."""
        return (1, self.in_channels, self.sequence_length)

    def __init__(
        self,
        batch_size: int = 128,
        val_size: int = 500,
        split_seed: int = 0,
        dataset_seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        _require_mnist1d()  # fail at build time, before a model is built for nothing
        self.val_size = check_int("val_size", val_size, minimum=0, maximum=TRAIN_SIZE - 1,
                                  meaning=f"sequences held out of the {TRAIN_SIZE} training ones")
        self.split_seed = check_int("split_seed", split_seed, minimum=0)
        self.dataset_seed = check_int("dataset_seed", dataset_seed, minimum=0,
                                      maximum=2**32 - 1)  # NumPy's seed range
        self.num_classes = 10
        self.in_channels = 1
        self.mean: float | None = None
        self.std: float | None = None
        self.split_indices: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # tensors are stage-independent; build them once
            return
        x, y, x_test, y_test = (torch.as_tensor(np.array(a)) for a in _generate(self.dataset_seed))
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        self.split_indices = {"train": order[self.val_size:], "val": order[: self.val_size]}
        train_x = x[self.split_indices["train"]]
        # Statistics in float64 from the training split alone, applied to every split.
        self.mean, self.std = train_x.mean().item(), train_x.std().item()

        def tensors(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
            inputs = ((inputs - self.mean) / self.std).to(torch.float32).unsqueeze(1)
            return inputs, targets.to(torch.long)

        self.train_set = TensorDataset(*tensors(train_x, y[self.split_indices["train"]]))
        self.test_set = TensorDataset(*tensors(x_test, y_test))
        if self.val_size == 0:  # as CIFARDataModule: said loudly, never silently
            rank_zero_warn("mnist1d: val_size=0 validates on the TEST set: val/acc is test "
                           "accuracy, so a best checkpoint or a sweep selected on it is not a "
                           "fair estimate; hold out training sequences with data.val_size=500")
            self.val_set = self.test_set
        else:
            idx = self.split_indices["val"]
            self.val_set = TensorDataset(*tensors(x[idx], y[idx]))

    def train_dataloader(self) -> DataLoader:
        """Shuffled from (seed, epoch) alone, as :class:`DigitsDataModule`'s, so a run
        resumed from an epoch's checkpoint trains exactly what the uninterrupted run
        trained. The seed is torch's initial seed: the app's ``seed`` after
        ``seed_everything``."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a loader")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        seed = torch.initial_seed()
        dataset = EpochKeyed(self.train_set, seed)
        return DataLoader(dataset, batch_size=self.batch_size,
                          sampler=EpochShuffle(dataset, seed, replicas, rank),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
