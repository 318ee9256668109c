"""A batch sampler whose batch size can change between batches, for `DataLoader(batch_sampler=)`.

Each epoch is one permutation of the dataset, cut into batches of whatever size the run is using
when each batch is drawn; a change in the middle of an epoch changes the cut, never which examples
the epoch covers. A DataLoader draws batches ahead of the loop (`prefetch_factor` per worker), so
a change reaches the loop a few batches later; the loop's helper (`AdaptiveBatchSize`) reads the
size of each batch it is handed, so the LR always matches the batch actually trained on.

Resuming: every batch drawn is queued as (epoch, start, end) in its permutation; the helper takes
one off the queue per optimizer step, so it knows the global size of the batch it trains and how
far the *trained* batches reached however far the loader has read ahead, and a checkpoint
resumes right after them (`resume_at`).

Data-parallel: every rank cuts the same permutation (same seed) into the same global batches and
takes every `world_size`-th example of each from position `rank`, so the ranks' shares are
disjoint, equal, and together are the global batch (a short final batch is trimmed to a multiple
of world_size for that).
"""

from __future__ import annotations

from collections import deque
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
        rank / world_size: this process's share of each global batch under data parallelism.
        remaining: called before each batch for the examples the run still has to draw (None:
            no limit); the batch is cut to it and the pass ends at 0, so a run of 2.5 epochs
            stops half-way through its third pass.
    """

    def __init__(self, dataset_size: int, batch_size: Callable[[], int], *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 remaining: Callable[[], int | None] | None = None) -> None:
        self.dataset_size = require_int("dataset_size", dataset_size)
        if not callable(batch_size):
            raise UsageError(f"batch_size={batch_size!r} must be a callable returning the current "
                             "batch size, e.g. lambda: adaptive.batch_size")
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.remaining = remaining
        self.world_size = require_int("world_size", world_size)
        self.rank = require_int("rank", rank, minimum=0, maximum=self.world_size - 1)
        self.epoch = 0
        self._offset = 0  # where in its epoch the next iteration starts (non-zero on a resume)
        self.passes_done = 0  # epochs iterated to their end (a resumed run counts those before)
        self.drawn: deque[tuple[int, int, int]] = deque()  # (epoch, start, end), not yet trained

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration covers (each iteration also advances it by one); setting
        the epoch a resume stopped in keeps the resume's place in it."""
        epoch = require_int("epoch", epoch, minimum=0)
        if epoch != self.epoch:
            self._offset = 0
        self.epoch = epoch

    def resume_at(self, epoch: int, offset: int) -> None:
        """Start the next iteration `offset` examples into epoch `epoch`'s permutation (an offset
        at the end of the epoch starts the next one)."""
        self.epoch = require_int("epoch", epoch, minimum=0)
        self._offset = require_int("offset", offset, minimum=0)
        self.drawn.clear()
        if self.dataset_size - self._offset < (self.batch_size() if self.drop_last else self.world_size):
            self.epoch, self._offset = self.epoch + 1, 0
        self.passes_done = self.epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self._offset
        order = self._order(epoch)
        self.drawn.clear()  # a new pass: whatever an abandoned one left queued was never trained
        self.epoch, self._offset = epoch + 1, 0
        while start < self.dataset_size:
            size = require_int("batch size", self.batch_size())
            end = min(start + size, self.dataset_size)
            if end - start < size and self.drop_last:
                break
            left = None if self.remaining is None else self.remaining()
            if left is not None:
                if left < self.world_size:
                    return  # the run's examples are all drawn: not a finished pass
                end = min(end, start + left)
            # Ranks take equal shares: a short final batch loses its last few (< world_size).
            end -= (end - start) % self.world_size
            if end == start:
                break
            self.drawn.append((epoch, start, end))
            yield order[start + self.rank:end:self.world_size]
            start = end
        self.passes_done = epoch + 1

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
