"""Deterministic, resumable, rank-sharded sampling.

Each epoch is a permutation of all sample indices drawn from (seed, epoch) alone. A position in
the stream is `DataPosition(epoch, position)` where `position` counts GLOBAL samples already
consumed in that epoch, so it means the same thing for any world size: resuming with a different
number of ranks continues the same global order with nothing skipped or repeated.

The training loop advances its own copy of the position with `advance()` for every batch it
actually consumes (DataLoader prefetching runs ahead; the checkpoint must record consumption).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

EPOCH_KEY_STRIDE = 1 << 32  # sample key = epoch * STRIDE + index (augmentation is seeded from it)


@dataclass(frozen=True)
class DataPosition:
    """Where the sample stream stands: epoch, and global samples consumed within it."""

    epoch: int = 0
    position: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataPosition":
        return cls(epoch=int(data["epoch"]), position=int(data["position"]))


def encode_sample_key(epoch: int, index: int) -> int:
    """Pack (epoch, dataset index) into one int the Dataset can unpack (works across workers)."""
    return epoch * EPOCH_KEY_STRIDE + index


def decode_sample_key(key: int) -> tuple[int, int]:
    """Inverse of `encode_sample_key` -> (epoch, index)."""
    return divmod(int(key), EPOCH_KEY_STRIDE)


class ResumableBatchSampler:
    """Infinite batch sampler over epochs; yields this rank's sample keys for each global batch.

    A global batch is `batch_size * world_size` consecutive entries of the epoch permutation;
    rank r takes entries r, r + W, ... . Every global batch is full, so every rank always gets
    exactly `batch_size` samples (an empty or short local batch would crash the collator or weigh
    ranks unequally): the epoch's last global batch wraps around to the start of the same epoch's
    permutation. Every index is seen at least once per epoch; the few wrapped ones twice. The batch
    at a position depends only on (seed, epoch, position, global batch size), so it is the same
    after a restart and well defined after a world-size change.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, start: DataPosition | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < 1:
            raise ValueError(f"dataset is empty (num_samples={num_samples})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.start = start or DataPosition()
        self._perm_cache: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's global order, a pure function of (seed, epoch)."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def advance(self, pos: DataPosition) -> DataPosition:
        """The position after one more global batch is consumed from `pos`."""
        nxt = pos.position + self.global_batch_size
        return DataPosition(pos.epoch + 1, 0) if nxt >= self.num_samples else DataPosition(pos.epoch, nxt)

    def global_batch(self, pos: DataPosition) -> np.ndarray:
        """Dataset indices of the global batch that starts at `pos` (always `global_batch_size` of them)."""
        perm = self.permutation(pos.epoch)
        return perm[(pos.position + np.arange(self.global_batch_size)) % self.num_samples]

    def local_keys(self, pos: DataPosition) -> list[int]:
        """This rank's sample keys for the global batch at `pos`."""
        return [encode_sample_key(pos.epoch, int(i)) for i in self.global_batch(pos)[self.rank:: self.world_size]]

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        while True:
            yield self.local_keys(pos)
            pos = self.advance(pos)
