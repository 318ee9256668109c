"""Does the user's data path keep up with the device?

At a given batch size the same training loop runs twice on the same model: once on batches
that already sit on the device (what the device can do), once on `workload.data_loader`
(what training actually gets). Neither loop synchronises per step, so whatever overlap of host
data loading with device compute a real training loop gets is kept; the device is synchronised
around each timed window only. The data path caps training when it delivers less than
`BOTTLENECK_RATIO` of the compute throughput *and* the time spent waiting in the loader's
`next()` explains the gap: the two windows run one after the other, so on a busy host a
compute window and a data-path window can differ by more than 10% for reasons that have
nothing to do with loading (on a shared 2-core box a loader taking 8% of the data path's time
once read as 38% slower), while time inside `next()` is measured directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from batchscope.oom import run_catching_oom
from batchscope.probes.timing import Clock, cycling, restarting, time_steps

# Below ~10% the difference is within what run-to-run noise and a busy host explain.
BOTTLENECK_RATIO = 0.9

DataLoaderFactory = Callable[[int, torch.device], Iterable[Any]]


@dataclass(frozen=True)
class PipelineCheck:
    """The same loop at one batch size on device-resident batches and on the user's data path."""

    batch_size: int
    compute_samples_per_s: float
    pipeline_samples_per_s: float
    data_s: float
    """Median host seconds per step spent in the data loader's `next()`."""
    steps: int
    loader_share: float = 1.0
    """Share of the data path's timed step time spent in `next()` (its total over theirs)."""

    @property
    def data_wait_fraction(self) -> float:
        """Share of the data path's step time not explained by compute (0 = loading is free
        or fully hidden behind compute)."""
        return min(1.0, max(0.0, 1.0 - self.pipeline_samples_per_s / self.compute_samples_per_s))

    @property
    def slower(self) -> bool:
        """The data path delivered less than BOTTLENECK_RATIO of the compute throughput."""
        return self.pipeline_samples_per_s < BOTTLENECK_RATIO * self.compute_samples_per_s

    @property
    def bottleneck(self) -> bool:
        """Slower, and the wait in the loader is large enough to be why."""
        return self.slower and self.loader_share >= 1 - BOTTLENECK_RATIO

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "compute_samples_per_s": self.compute_samples_per_s,
            "pipeline_samples_per_s": self.pipeline_samples_per_s,
            "data_s": self.data_s,
            "data_wait_fraction": self.data_wait_fraction,
            "bottleneck": self.bottleneck,
            "loader_share": self.loader_share,
            "steps": self.steps,
        }


@dataclass(frozen=True)
class InputPipelineResult:
    """All checks, headlined by the checked size where the data path costs the most."""

    checks: tuple[PipelineCheck, ...]
    note: str

    @property
    def worst(self) -> PipelineCheck | None:
        if not self.checks:
            return None
        return max(self.checks, key=lambda check: check.data_wait_fraction)

    @property
    def bottleneck(self) -> bool | None:
        """True when the data path caps throughput at any checked size; None if unmeasured."""
        return None if not self.checks else any(check.bottleneck for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        if worst is not None:
            headline = worst.to_dict()
        else:
            headline = dict.fromkeys(("batch_size", "compute_samples_per_s",
                                      "pipeline_samples_per_s", "data_s", "data_wait_fraction",
                                      "loader_share", "steps"))
        headline.update(
            measured=worst is not None,
            bottleneck=self.bottleneck,
            note=self.note,
            checks=[check.to_dict() for check in self.checks],
        )
        return headline


def not_measured(reason: str) -> InputPipelineResult:
    return InputPipelineResult((), f"not measured: {reason}")


def check_input_pipeline(
    run_step: Callable[[Any], Any],
    device_batches: Callable[[int], list[Any]],
    data_loader: DataLoaderFactory,
    device: torch.device,
    batch_sizes: Sequence[int],
    *,
    warmup_steps: int,
    timed_steps: int,
    max_seconds: float | None,
    after_oom: Callable[[], None] = lambda: None,
    clock: Clock = time.perf_counter,
) -> InputPipelineResult:
    """Compare device-resident batches with `data_loader` at each of `batch_sizes`.

    `device_batches(B)` pre-builds a few batches on the device; `after_oom` cleans up the
    training state after an out-of-memory (the loader's batches can be bigger than
    `make_batch`'s, e.g. longer sequences), which ends the check with what was measured.
    """
    loop = dict(warmup_steps=warmup_steps, timed_steps=timed_steps, max_seconds=max_seconds,
                sync_each_step=False, clock=clock)
    checks: list[PipelineCheck] = []
    for batch_size in sorted(set(batch_sizes)):

        def measure(batch_size: int = batch_size) -> PipelineCheck:
            compute = time_steps(run_step, cycling(device_batches(batch_size)), device, **loop)
            loader = restarting(lambda: data_loader(batch_size, device))
            pipeline = time_steps(run_step, loader, device, **loop)
            return PipelineCheck(
                batch_size=batch_size,
                compute_samples_per_s=batch_size / compute.mean_wall_step_s,
                pipeline_samples_per_s=batch_size / pipeline.mean_wall_step_s,
                data_s=pipeline.median_data_s,
                steps=pipeline.timed_steps,
                loader_share=sum(pipeline.data_seconds) / max(sum(pipeline.step_seconds), 1e-12),
            )

        outcome = run_catching_oom(measure, device)
        if outcome.oom:
            after_oom()
            note = f"the data path ran out of memory at batch size {batch_size} ({outcome.message})"
            if checks:
                note += "; " + describe(checks)
            return InputPipelineResult(tuple(checks), note)
        checks.append(outcome.value)
    return InputPipelineResult(tuple(checks), describe(checks))


def describe(checks: Sequence[PipelineCheck]) -> str:
    """One sentence with the numbers, at the size where loading costs the most."""
    worst = max(checks, key=lambda check: check.data_wait_fraction)
    numbers = (f"at batch size {worst.batch_size} the data path delivers "
               f"{worst.pipeline_samples_per_s:.1f} samples/s against "
               f"{worst.compute_samples_per_s:.1f} samples/s with batches already on the device "
               f"({worst.data_wait_fraction:.0%} fewer; {worst.data_s * 1e3:.1f} ms per batch in "
               f"the loader, {worst.loader_share:.0%} of the data path's time)")
    if worst.bottleneck:
        return (f"the input pipeline caps throughput: {numbers}; more loader workers, pinned "
                f"memory, or caching decoded data would help")
    if worst.slower:
        return (f"the input pipeline keeps up: {numbers}; waiting for batches explains too "
                f"little of the gap, so it is not loading: run-to-run noise on a busy host, or "
                f"loader workers competing with the step for the CPU")
    return f"the input pipeline keeps up: {numbers}"
