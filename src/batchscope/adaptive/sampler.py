"""A batch sampler whose batch size can change between batches, for `DataLoader(batch_sampler=)`.

Each epoch is one permutation of the dataset, cut into batches of whatever size the run is using
when each batch is drawn; a change in the middle of an epoch changes the cut, never which examples
the epoch covers. A DataLoader draws batches ahead of the loop (`prefetch_factor` per worker), so
a change reaches the loop a few batches later; the loop's helper (`AdaptiveBatchSize`) reads the
size of each batch it is handed, so the LR always matches the batch actually trained on.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import Sampler

from batchscope.checks import require_int
from batchscope.errors import UsageError


class AdaptiveBatchSampler(Sampler[list[int]]):
    """Index batches of `batch_size()` examples over `dataset_size` examples.

    Args:
        dataset_size: examples in the dataset (indices 0..dataset_size-1).
        batch_size: called before each batch for its size (e.g. `lambda: adaptive.batch_size`).
        shuffle: a new permutation each epoch, from `seed` and the epoch number, so a run is
            repeatable and a resumed run sees the same order.
        drop_last: drop an epoch's final batch when it is smaller than the size asked for.
    """

    def __init__(self, dataset_size: int, batch_size: Callable[[], int], *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        self.dataset_size = require_int("dataset_size", dataset_size)
        if not callable(batch_size):
            raise UsageError(f"batch_size={batch_size!r} must be a callable returning the current "
                             "batch size, e.g. lambda: adaptive.batch_size")
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration covers (each iteration also advances it by one)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise UsageError(f"epoch={epoch!r} must be an int >= 0")
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order(self.epoch)
        self.epoch += 1
        start = 0
        while start < self.dataset_size:
            size = require_int("batch size", self.batch_size())
            end = start + size
            if end > self.dataset_size and self.drop_last:
                return
            yield order[start:end]
            start = end

    def __len__(self) -> int:
        """Batches in an epoch at the current batch size (a change mid-epoch makes it stale)."""
        size = require_int("batch size", self.batch_size())
        full, rest = divmod(self.dataset_size, size)
        return full if self.drop_last or rest == 0 else full + 1

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=generator).tolist()
