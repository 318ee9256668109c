"""Does the user's data path keep up with the device?

At a given batch size the same training loop runs on batches that already sit on the device
(what the device can do), then on `workload.data_loader` (what training actually gets), then
on the device-resident batches again. Neither loop synchronises per step, so whatever overlap
of host data loading with device compute a real training loop gets is kept; the device is
synchronised around each timed window only.

The data path caps training when it delivers less than `BOTTLENECK_RATIO` of the compute
throughput measured on *both* sides of it. The windows run one after the other, so a host
that gets busier or quieter during the check moves one window and not another; on a shared
2-core box a single compute window before the data path once read 38% faster than it, with the
loader's `next()` taking 8% of the time. Bracketing rejects such drift without guessing at
causes, so costs that do not show inside `next()` still count: host-to-device copies queued
on the stream, or loader workers taking cores from the step.
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
# Timed windows per checked size: device-resident, the data path, device-resident again.
TIMED_WINDOWS = 3

DataLoaderFactory = Callable[[int, torch.device], Iterable[Any]]


@dataclass(frozen=True)
class PipelineCheck:
    """The same loop at one batch size on device-resident batches and on the user's data path."""

    batch_size: int
    compute_samples_per_s: float
    """The slower of the two device-resident windows around the data path."""
    pipeline_samples_per_s: float
    data_s: float
    """Median host seconds per step spent in the data loader's `next()`."""
    steps: int
    loader_share: float = 1.0
    """Share of the data path's wall time spent inside `next()` (reported, not part of the
    verdict: asynchronous copies and workers' contention cost time outside it)."""
    compute_spread: float = 0.0
    """How far apart the two device-resident windows were, relative to the faster one: the
    host's drift during the check."""

    @property
    def data_wait_fraction(self) -> float:
        """Share of the data path's step time not explained by compute (0 = loading is free
        or fully hidden behind compute)."""
        return min(1.0, max(0.0, 1.0 - self.pipeline_samples_per_s / self.compute_samples_per_s))

    @property
    def bottleneck(self) -> bool:
        """The data path delivered less than BOTTLENECK_RATIO of the compute throughput on
        both sides of it."""
        return self.pipeline_samples_per_s < BOTTLENECK_RATIO * self.compute_samples_per_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "compute_samples_per_s": self.compute_samples_per_s,
            "pipeline_samples_per_s": self.pipeline_samples_per_s,
            "data_s": self.data_s,
            "data_wait_fraction": self.data_wait_fraction,
            "bottleneck": self.bottleneck,
            "loader_share": self.loader_share,
            "compute_spread": self.compute_spread,
            "steps": self.steps,
        }


@dataclass(frozen=True)
class InputPipelineResult:
    """All checks, headlined by the checked size where the data path costs the most."""

    checks: tuple[PipelineCheck, ...]
    note: str

    @property
    def worst(self) -> PipelineCheck | None:
        """The largest data wait (a bottleneck whenever any checked size has one)."""
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
                                      "loader_share", "compute_spread", "steps"))
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
            resident = device_batches(batch_size)
            before = time_steps(run_step, cycling(resident), device, **loop)
            loader = restarting(lambda: data_loader(batch_size, device))
            pipeline = time_steps(run_step, loader, device, **loop)
            after = time_steps(run_step, cycling(resident), device, **loop)
            slow_s, fast_s = sorted((before.mean_wall_step_s, after.mean_wall_step_s), reverse=True)
            return PipelineCheck(
                batch_size=batch_size,
                compute_samples_per_s=batch_size / slow_s,
                pipeline_samples_per_s=batch_size / pipeline.mean_wall_step_s,
                data_s=pipeline.median_data_s,
                steps=pipeline.timed_steps,
                loader_share=min(1.0, sum(pipeline.data_seconds) / pipeline.wall_seconds),
                compute_spread=1.0 - fast_s / slow_s,
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
               f"({worst.data_wait_fraction:.0%} fewer; median {worst.data_s * 1e3:.1f} ms per "
               f"batch in the loader, {worst.loader_share:.0%} of the data path's time)")
    if worst.bottleneck:
        return (f"the input pipeline caps throughput: {numbers}; more loader workers, pinned "
                f"memory, or caching decoded data would help")
    return f"the input pipeline keeps up: {numbers}"
