"""Training order and augmentation drawn from (seed, epoch, sample), never from a global RNG.

Lightning checkpoints neither the RNG states nor a plain DataLoader's position, so a run
resumed from ``last.ckpt`` only trains what the uninterrupted run trained if every random
choice of an epoch can be recomputed from the epoch number. :class:`EpochShuffle` shuffles
by ``seed + epoch`` (Lightning calls ``set_epoch`` at every epoch start, after a restore
too) and hands the dataset ``(epoch, index)`` keys; :class:`EpochKeyed` seeds each sample's
augmentation from ``(seed, epoch, index)``. That holds in DataLoader workers and on every
DDP rank alike (the sampler is a ``DistributedSampler``, which Lightning leaves in place).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["EpochKeyed", "EpochShuffle", "sample_seed"]

_MASK = 2**63 - 1  # torch generators take seeds below 2**64; keep sums clear of it


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one sample's augmentation in one epoch (distinct for nearby triples)."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) & _MASK


class EpochShuffle(DistributedSampler):
    """Shuffles by ``seed + epoch`` and yields ``(epoch, index)`` keys for :class:`EpochKeyed`.

    With ``num_replicas=1`` it is a plain epoch-seeded shuffle; under DDP each rank reads its
    shard, as with Lightning's own ``DistributedSampler``.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed & (_MASK >> 1))

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class EpochKeyed(Dataset):
    """``dataset`` read with ``(epoch, index)`` keys; ``augment(sample, generator)``, if
    given, draws from a generator seeded by :func:`sample_seed`. Plain integer keys read
    epoch 0."""

    def __init__(self, dataset: Dataset, seed: int,
                 augment: Callable[[Any, torch.Generator], Any] | None = None) -> None:
        self.dataset, self.seed, self.augment = dataset, seed, augment

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.dataset[index]
        if self.augment is None:
            return sample
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return self.augment(sample, generator)
