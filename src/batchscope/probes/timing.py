"""Timing training steps the way a benchmark has to, so the numbers mean what they say.

Three things make a naive `time.time()` around a training step wrong:
- the first steps are not representative: they pay for cuDNN autotuning, the caching allocator
  growing its pool, lazy optimizer-state allocation (the first `step()` creates momentum buffers)
  and, with a data loader, worker start-up. They run as warm-up and are never timed.
- accelerators run asynchronously: the host returns from `backward()` long before the kernels
  finish, so a clock read is only meaningful after `device.synchronize` (a no-op on CPU).
- one step is one sample of a noisy quantity (other processes, GC, clock boosts): several
  steps are timed and summarised by the median (robust to one slow outlier) with the
  inter-quartile range relative to it as the spread.

Each timed step is split into the time spent *getting* the batch (`next_batch()`, host clock)
and the time spent *using* it (forward, backward, optimizer step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from batchscope.device import synchronize
from batchscope.errors import UsageError

Clock = Callable[[], float]

# Timed steps a capped measurement still takes: enough for a median and a quartile spread.
DEFAULT_MIN_TIMED_STEPS = 3


@dataclass(frozen=True)
class StepTimes:
    """Raw timings of the timed (post-warm-up) steps of one measurement."""

    step_seconds: tuple[float, ...]
    """Per timed step: fetching the batch plus computing on it."""
    data_seconds: tuple[float, ...]
    """Per timed step: the part spent in `next_batch()`."""
    wall_seconds: float
    """Synchronised wall clock from the start of the first timed step to the end of the last."""
    warmup_steps: int
    """Warm-up steps actually run (fewer than asked when the time cap cut them short)."""

    @property
    def timed_steps(self) -> int:
        return len(self.step_seconds)

    @property
    def median_step_s(self) -> float:
        return float(np.median(self.step_seconds))

    @property
    def median_data_s(self) -> float:
        return float(np.median(self.data_seconds))

    @property
    def median_compute_s(self) -> float:
        return float(np.median(np.subtract(self.step_seconds, self.data_seconds)))

    @property
    def spread(self) -> float:
        """Inter-quartile range of the step times over their median (0 = perfectly steady)."""
        return relative_iqr(self.step_seconds)

    @property
    def mean_wall_step_s(self) -> float:
        """Wall time per step over the whole timed window (includes any overlap the device
        achieved between steps, which per-step medians cannot see when not synchronising)."""
        return self.wall_seconds / self.timed_steps


def relative_iqr(values: Any) -> float:
    """(75th - 25th percentile) / median; NaN for an empty or zero-median sample."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return math.nan
    median = float(np.median(array))
    if median <= 0:
        return math.nan
    q75, q25 = np.percentile(array, [75, 25])
    return float((q75 - q25) / median)


def time_steps(
    run_step: Callable[[Any], Any],
    next_batch: Callable[[], Any],
    device: torch.device,
    *,
    warmup_steps: int,
    timed_steps: int,
    max_seconds: float | None = None,
    min_timed_steps: int = DEFAULT_MIN_TIMED_STEPS,
    sync_each_step: bool = True,
    clock: Clock = time.perf_counter,
) -> StepTimes:
    """Run `warmup_steps` untimed then up to `timed_steps` timed steps of
    `run_step(next_batch())`.

    `max_seconds` caps one measurement (warm-up included) so a huge batch cannot eat the
    probe's time: once it is spent, warm-up ends after its first step and the timed loop ends
    after `min_timed_steps` (enough for a median and a quartile spread).

    `sync_each_step=True` brackets every step with a device synchronisation, so each step time
    is exactly that step's work (the price: the device idles for one kernel-launch latency per
    step, tens of microseconds, negligible against steps above a millisecond). With False the
    device is synchronised only around the whole timed window: per-step times are then host
    times, but `wall_seconds` keeps whatever overlap a real training loop gets between fetching
    the next batch on the host and computing the current one on the device.
    """
    min_timed_steps = min(min_timed_steps, timed_steps)
    started = clock()

    def over_budget() -> bool:
        return max_seconds is not None and clock() - started > max_seconds

    warmed = 0
    for _ in range(warmup_steps):
        run_step(next_batch())
        warmed += 1
        if over_budget():
            break
    # The warm-up's queued kernels must not leak into the first timed step.
    synchronize(device)

    steps: list[float] = []
    data: list[float] = []
    window_start = clock()
    for _ in range(timed_steps):
        before_fetch = clock()
        batch = next_batch()
        after_fetch = clock()
        run_step(batch)
        if sync_each_step:
            synchronize(device)
        after_step = clock()
        data.append(after_fetch - before_fetch)
        steps.append(after_step - before_fetch)
        del batch
        if len(steps) >= min_timed_steps and over_budget():
            break
    synchronize(device)
    wall = clock() - window_start
    return StepTimes(tuple(steps), tuple(data), wall, warmed)


def predicted_seconds(step_s: float, *, warmup_steps: int, timed_steps: int,
                      max_seconds: float | None = None,
                      min_timed_steps: int = DEFAULT_MIN_TIMED_STEPS) -> float:
    """Seconds `time_steps` takes with these settings when every step takes `step_s`: its
    stopping rule replayed (a capped measurement still finishes the step that crosses the cap
    and takes `min_timed_steps` timed steps), so a budget can be checked before measuring."""
    min_timed_steps = min(min_timed_steps, timed_steps)
    elapsed = 0.0
    for _ in range(warmup_steps):
        elapsed += step_s
        if max_seconds is not None and elapsed > max_seconds:
            break
    for timed in range(1, timed_steps + 1):
        elapsed += step_s
        if timed >= min_timed_steps and max_seconds is not None and elapsed > max_seconds:
            break
    return elapsed


def cycling(batches: list[Any]) -> Callable[[], Any]:
    """`next_batch` over pre-built batches, round robin: fetching costs a list index, so the
    measured step is pure compute."""
    position = 0

    def next_batch() -> Any:
        nonlocal position
        batch = batches[position % len(batches)]
        position += 1
        return batch

    return next_batch


def restarting(make_iterator: Callable[[], Any]) -> Callable[[], Any]:
    """`next_batch` over a user iterator that starts a new pass when one ends (a finite
    per-epoch loader keeps going, as in training; the restart is charged to data time)."""
    iterator = iter(make_iterator())

    def next_batch() -> Any:
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:
            iterator = iter(make_iterator())
            try:
                return next(iterator)
            except StopIteration:
                raise UsageError(
                    "the workload's data_loader yielded no batches; check that it yields at "
                    "least one batch at this batch size (drop_last with a batch larger than "
                    "the dataset yields none)"
                ) from None

    return next_batch
