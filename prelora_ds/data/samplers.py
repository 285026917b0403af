"""Samplers: the resumable, shuffled train order every input path is driven by, and the exact val split.

The train order is a function of (seed, epoch, world size, rank) only, and a resumed rank skips the head it
already consumed: the ``torch`` and the ``device`` loaders, on files or on shards, all take their indices here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DistributedSampler, Sampler

from prelora_ds.errors import ConfigError

__all__ = ["ResumableDistributedSampler", "ShardSampler", "check_train_size"]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the first `n` samples of this rank's list, for this epoch only.

    Resume mid-epoch with ``set_epoch(e)`` then ``skip(batches_done * micro_batch)``: the order is the same
    permutation as without the skip (seed + epoch), minus its head. ``set_epoch`` resets the skip.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start_index = 0

    def skip(self, n: int) -> None:
        if not 0 <= n <= self.num_samples:
            raise ValueError(f"cannot skip {n} samples: this rank has {self.num_samples} per epoch.")
        self.start_index = n

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class ShardSampler(Sampler[int]):
    """Validation indices ``rank::world_size``: no padding, no duplicates, so summed correct/total is exact.

    Ranks may get a different number of batches (one more at most); keep collectives out of the per-batch loop.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def check_train_size(n_train: int, micro_batch: int, world_size: int) -> None:
    """Every rank needs at least one full micro batch (train.py checks this before any process group starts)."""
    if n_train < micro_batch * world_size:
        raise ConfigError(
            f"the train set has {n_train} images, fewer than micro_batch ({micro_batch}) x world_size "
            f"({world_size}) = {micro_batch * world_size}, so no rank gets a full batch; lower "
            "train_micro_batch_size_per_gpu, use fewer GPUs or a larger dataset."
        )

