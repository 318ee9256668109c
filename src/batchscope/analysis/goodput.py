"""Goodput: which global batch size reaches the target soonest on this machine (Pollux, OSDI 2021).

Time to target = examples needed / examples per second. Examples needed grow as
E_min (1 + B/B_noise) (see efficiency.py) and X(B) is the measured throughput, so
    time(B) ∝ (B + B_noise) / X(B),
equivalently the batch maximises goodput X(B) (B_noise + B0)/(B_noise + B). For an affine step
time t = a + b B this is a + b B_noise + b B + a B_noise / B: convex, with its optimum at
B* = sqrt(a B_noise / b) - the balance between per-step overhead (wants big B) and wasted
examples (wants small B).

A global batch bigger than what fits in memory runs as k accumulated micro batches of size
m = ceil(B / k), with k the smallest count that keeps m <= max_fit; we charge k full steps of
t(m), slightly pessimistic since the optimizer update runs once, not k times. Accumulation is only
used where it is needed: it never raises throughput under a step-time model that grows with B.

Data parallelism over W devices: a global batch B gives each device a share b = ceil(B / W),
run as above (k micro batches of m <= max_fit), and all W devices step together, so
X(B) = B / (k t(m) + s) with t the per-device step time measured on one device and s the
gradient all-reduce's seconds per optimizer step (once per step, after the last micro batch),
when it was measured: counted in full, as if nothing overlapped it with the backward pass, so
slightly pessimistic. Since (B + B_noise) / X(B) = (b + B_noise/W) / X_1(b), with
X_1(b) = b / (k t(m) + s) one device's throughput, this is the one-device plan for the
per-device batch against a noise scale of B_noise / W (what the adaptive mode uses under DDP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from batchscope.analysis._checks import finite_or_none, positive_int, positive_number
from batchscope.analysis.efficiency import statistical_efficiency
from batchscope.analysis.throughput_model import KNEE_FRACTION
from batchscope.errors import UsageError


class StepTimeModel(Protocol):
    def step_seconds(self, batch_size: Any) -> Any: ...


@dataclass(frozen=True)
class GoodputPoint:
    """One candidate global batch size on the plan's curve (relative_time None when infeasible;
    micro_batch_size is per device)."""

    batch_size: int
    micro_batch_size: int | None
    accumulation: int | None
    samples_per_s: float | None
    efficiency: float
    relative_time: float | None

    @property
    def feasible(self) -> bool:
        return self.relative_time is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "accumulation": self.accumulation,
            "samples_per_s": finite_or_none(self.samples_per_s),
            "efficiency": finite_or_none(self.efficiency),
            "relative_time": finite_or_none(self.relative_time),
            "feasible": self.feasible,
        }


@dataclass(frozen=True)
class GoodputPlan:
    """The batch size that minimises time to target, how to run it, and the curve behind it."""

    batch_size: int
    micro_batch_size: int
    accumulation: int
    relative_time: float
    speedup_vs_reference: float
    good_range: tuple[int, int]
    reference_batch_size: int
    noise_scale: float | None
    mode: str  # "goodput", or "throughput_only" when no usable noise scale was given
    tolerance: float
    notes: tuple[str, ...]
    curve: tuple[GoodputPoint, ...]
    world_size: int = 1  # data-parallel devices; batch_size is global, micro_batch_size per device
    sync_seconds: float = 0.0  # the gradient all-reduce per optimizer step, when measured

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "sync_seconds": self.sync_seconds,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "accumulation": self.accumulation,
            "relative_time": finite_or_none(self.relative_time),
            "speedup_vs_reference": finite_or_none(self.speedup_vs_reference),
            "good_range": list(self.good_range),
            "reference_batch_size": self.reference_batch_size,
            "noise_scale": finite_or_none(self.noise_scale),
            "mode": self.mode,
            "tolerance": self.tolerance,
            "notes": list(self.notes),
            "curve": [point.to_dict() for point in self.curve],
        }


def goodput(batch_size: Any, samples_per_s: Any, noise_scale: float, base_batch_size: float) -> Any:
    """Useful examples per second: X(B) (B_noise + B0)/(B_noise + B), in units of B0-batch examples."""
    rate = np.asarray(samples_per_s, dtype=float)
    result = rate * statistical_efficiency(batch_size, noise_scale, base_batch_size)
    return float(result) if np.ndim(result) == 0 else result


def accumulation_for(batch_size: int, max_fit_batch_size: int, max_accumulation: int) -> tuple[int, int] | None:
    """(micro_batch_size, accumulation) for a global batch: fewest micro batches with each one
    <= max_fit; None when even `max_accumulation` micro batches cannot hold it."""
    batch = positive_int("batch_size", batch_size)
    max_fit = positive_int("max_fit_batch_size", max_fit_batch_size)
    steps = math.ceil(batch / max_fit)
    if steps > positive_int("max_accumulation", max_accumulation):
        return None
    return math.ceil(batch / steps), steps


def device_split(batch_size: int, max_fit_batch_size: int, max_accumulation: int,
                 world_size: int = 1) -> tuple[int, int] | None:
    """(micro_batch_size per device, accumulation) for a global batch over `world_size`
    devices: each device's share ceil(B / W) split as in `accumulation_for`."""
    share = math.ceil(positive_int("batch_size", batch_size) / positive_int("world_size", world_size))
    return accumulation_for(share, max_fit_batch_size, max_accumulation)


def global_samples_per_s(batch_size: int, model: StepTimeModel, max_fit_batch_size: int,
                         max_accumulation: int, world_size: int = 1,
                         sync_seconds: float = 0.0) -> float | None:
    """X(B) = B / (k t(m) + s) with the split of `device_split`; None when infeasible."""
    split = device_split(batch_size, max_fit_batch_size, max_accumulation, world_size)
    if split is None:
        return None
    micro, steps = split
    return batch_size / (steps * float(model.step_seconds(micro)) + sync_seconds)


def plan_batch_size(
    candidates: Any,
    throughput_model: StepTimeModel,
    noise_scale: float | None,
    max_fit_batch_size: int,
    reference_batch_size: int,
    max_accumulation: int = 16,
    tolerance: float = 0.10,
    world_size: int = 1,
    sync_seconds: float = 0.0,
) -> GoodputPlan:
    """Pick the candidate global batch with the shortest predicted time to target, on
    `world_size` data-parallel devices (module docstring); micro batches are per device.

    `noise_scale` None or non-finite (not measured, or unresolved) switches to throughput-only
    mode: statistical efficiency is taken as 1, so the plan takes the throughput knee (the
    smallest batch reaching KNEE_FRACTION of the best throughput) rather than the largest batch
    that gains a sliver more throughput; the plan says so in `mode` and `notes`.
    """
    batches = sorted({positive_int("candidate batch size", value) for value in np.atleast_1d(candidates).tolist()})
    max_fit = positive_int("max_fit_batch_size", max_fit_batch_size)
    reference = positive_int("reference_batch_size", reference_batch_size)
    max_accumulation = positive_int("max_accumulation", max_accumulation)
    tolerance = positive_number("tolerance", tolerance)
    world = positive_int("world_size", world_size)
    sync = _sync_seconds(sync_seconds)
    noise, mode, notes = _noise_mode(noise_scale)

    def time_per_example(batch: int) -> float | None:
        rate = global_samples_per_s(batch, throughput_model, max_fit, max_accumulation, world, sync)
        if rate is None:
            return None
        return (1.0 / rate) / _efficiency(batch, noise, reference)

    reference_time = time_per_example(reference)
    if reference_time is None:
        raise UsageError(f"reference_batch_size={reference} needs more than max_accumulation={max_accumulation} "
                         f"micro batches of {max_fit}{f' on each of {world} devices' if world > 1 else ''}; "
                         f"raise max_accumulation")

    curve = []
    for batch in batches:
        split = device_split(batch, max_fit, max_accumulation, world)
        seconds = time_per_example(batch)
        curve.append(GoodputPoint(
            batch_size=batch,
            micro_batch_size=None if split is None else split[0],
            accumulation=None if split is None else split[1],
            samples_per_s=global_samples_per_s(batch, throughput_model, max_fit, max_accumulation, world,
                                               sync),
            efficiency=_efficiency(batch, noise, reference),
            relative_time=None if seconds is None else seconds / reference_time,
        ))
    feasible = [point for point in curve if point.feasible]
    if not feasible:
        raise UsageError(f"no candidate batch size fits in {max_accumulation} micro batches of "
                         f"{max_fit}; pass smaller candidates or raise max_accumulation")
    best = min(feasible, key=lambda point: point.relative_time)  # first minimum: the smaller batch wins ties
    good = [p.batch_size for p in feasible if p.relative_time <= best.relative_time * (1.0 + tolerance)]
    if noise is None:
        # Without a noise scale every batch looks statistically free, so the fastest one is
        # simply the largest that still gains throughput. Past the throughput knee the gain is a
        # few percent while the real efficiency can only fall: take the knee.
        # (relative_time is 1/throughput here, efficiency being 1.)
        best = next(p for p in feasible if p.relative_time * KNEE_FRACTION <= best.relative_time)
        notes.append(f"throughput-only: batch {best.batch_size} is the smallest reaching "
                     f"{KNEE_FRACTION:.0%} of the best throughput; larger batches gain little "
                     "throughput and lose statistical efficiency that could not be measured")
    notes.extend(_edge_notes(best, feasible))
    return GoodputPlan(
        batch_size=best.batch_size,
        micro_batch_size=best.micro_batch_size,  # type: ignore[arg-type]
        accumulation=best.accumulation,  # type: ignore[arg-type]
        relative_time=best.relative_time,  # type: ignore[arg-type]
        speedup_vs_reference=1.0 / best.relative_time,  # type: ignore[operator]
        good_range=(min(min(good), best.batch_size), max(good)),
        reference_batch_size=reference,
        noise_scale=noise,
        mode=mode,
        tolerance=tolerance,
        notes=tuple(notes),
        curve=tuple(curve),
        world_size=world,
        sync_seconds=sync,
    )


def _sync_seconds(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value < 0:
        raise UsageError(f"sync_seconds={value!r} must be a finite number of seconds >= 0 (the "
                         "gradient all-reduce per step; 0 when not measured)")
    return float(value)


def _noise_mode(noise_scale: float | None) -> tuple[float | None, str, list[str]]:
    if noise_scale is None or (isinstance(noise_scale, (int, float)) and not math.isfinite(noise_scale)):
        return None, "throughput_only", [
            "no usable gradient noise scale: the plan follows throughput alone and cannot weigh statistical "
            "efficiency, which only falls as the batch grows"
        ]
    if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float, np.integer, np.floating)):
        raise UsageError(f"noise_scale={noise_scale!r} is not a number; pass B_simple or None")
    if noise_scale < 0:
        raise UsageError(f"noise_scale={noise_scale!r} is negative; pass None to plan from throughput only")
    return float(noise_scale), "goodput", []


def _efficiency(batch: int, noise: float | None, reference: int) -> float:
    return 1.0 if noise is None else float(statistical_efficiency(batch, noise, reference))


def _edge_notes(best: GoodputPoint, feasible: list[GoodputPoint]) -> list[str]:
    notes = []
    if len(feasible) > 1 and best is feasible[-1]:
        notes.append(f"the optimum is the largest feasible candidate ({best.batch_size}): a larger batch "
                     "might be faster still")
    if len(feasible) > 1 and best is feasible[0]:
        notes.append(f"the optimum is the smallest candidate ({best.batch_size}): a smaller batch might be faster")
    if best.accumulation and best.accumulation > 1:
        notes.append(f"batch {best.batch_size} runs as {best.accumulation} accumulated micro batches of "
                     f"{best.micro_batch_size}")
    return notes
