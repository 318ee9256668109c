"""Throughput probe: samples per second at each batch size, the knee, and the input pipeline.

What it does, in order:
1. Picks the grid: the given `batch_sizes`, else powers of two from 8 up to a cap. The cap is
   `max_batch_size`, else the memory probe's recommended size on an accelerator, else (CPU, no
   budget) `DEFAULT_CPU_MAX_BATCH_SIZE`, which the result says in its notes.
2. Builds the model and optimizer once, then for each batch size, smallest first: pre-builds a
   few device-resident batches with `workload.make_batch` (so the timed steps wait for no
   data), runs warm-up steps, then times full training steps (forward, backward, optimizer
   step) with the device synchronised around each (see `probes.timing`).
3. Stops growing the batch when the curve has flattened (`analysis.throughput_model.
   has_flattened`: each of the last `EARLY_STOP_PATIENCE` sizes gained less than
   `1 - fraction` over the best throughput before it; two in a row, so one noisy point does
   not end the search) or at the first out-of-memory; every measurement before stays.
   Each size is also capped in time (`max_seconds_per_point`). Within a time budget, a size
   whose predicted cost (its steps at the step time extrapolated from the last two sizes)
   exceeds the time left is not started.
4. Fits the step-time model (`analysis.throughput_model`) to interpolate between sizes, and
   reports the knee: the smallest measured batch within `fraction` of the best throughput.
5. Input pipeline (`probes.input_pipeline`): at the knee and the best size, the same training
   loop on device-resident batches and on the user's `workload.data_loader`; when the data path
   delivers clearly less, the result says it caps training, with both numbers.
6. Optional variants (e.g. bf16 autocast + channels_last) repeat step 2-4 on a copy of the
   workload with those settings, to show what the switches would buy.

Everything runs inside `guard.StateGuard`: the user's model, optimizer and every RNG come back
exactly as they were, whether the probe finishes, fails or is interrupted.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from batchscope.analysis.throughput_model import has_flattened
from batchscope.checks import require_int
from batchscope.device import release_memory, resolve_device
from batchscope.errors import ProbeFailedError, UsageError
from batchscope.guard import StateGuard
from batchscope.oom import run_catching_oom
from batchscope.probes.input_pipeline import (
    InputPipelineResult,
    check_input_pipeline,
    not_measured,
)
from batchscope.probes.throughput_recheck import remeasure_contradicted
from batchscope.probes.throughput_result import (
    Curve,
    ThroughputPoint,
    ThroughputResult,
    VariantResult,
)
from batchscope.probes.timing import StepTimes, cycling, predicted_seconds, time_steps
from batchscope.step import build_model, needs_grad_scaler, train_step
from batchscope.workload import Workload, resolve_workload

__all__ = [
    "Curve",
    "ThroughputPoint",
    "ThroughputResult",
    "VariantResult",
    "check_data_path",
    "geometric_grid",
    "measure_throughput",
]

logger = logging.getLogger(__name__)

DEFAULT_WARMUP_STEPS = 3
DEFAULT_TIMED_STEPS = 10
DEFAULT_MAX_SECONDS_PER_POINT = 10.0
DEFAULT_MIN_BATCH_SIZE = 8
DEFAULT_CPU_MAX_BATCH_SIZE = 256
EARLY_STOP_PATIENCE = 2
# Distinct pre-built batches cycled through during timing: more than one so a cache cannot
# make the same input look cheaper, few so they cost little memory next to the activations.
BATCH_POOL_SIZE = 3
BATCH_SEED = 0
# The grid's last power of two is followed by the cap itself only when the cap is clearly
# larger: measuring 260 after 256 costs a point and tells nothing new.
CAP_MIN_STEP = 1.2

DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "bf16+channels_last": {"autocast_dtype": torch.bfloat16, "channels_last": True},
}


def measure_throughput(
    workload: Workload | str,
    batch_sizes: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    max_batch_size: int | None = None,
    min_batch_size: int | None = None,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    timed_steps: int = DEFAULT_TIMED_STEPS,
    fraction: float = 0.95,
    early_stop: bool = True,
    data_path: bool = True,
    variants: bool | Mapping[str, Mapping[str, Any]] = False,
    max_seconds_per_point: float | None = DEFAULT_MAX_SECONDS_PER_POINT,
    time_budget_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> ThroughputResult:
    """Measure training throughput over batch sizes; see the module docstring for the method.

    `workload` is a `Workload`, a built-in name or a `package.module:function` entry point.

    `variants=True` adds the bf16-autocast + channels_last curve; a mapping `{name: settings}`
    adds one curve per entry (settings are `Workload` fields, e.g. `{"autocast_dtype":
    torch.bfloat16}`). `min_batch_size` starts the default grid there instead of at 8 (tune
    passes the BatchNorm floor: sizes its plan cannot pick are not worth a point).
    `data_path=False` skips the input-pipeline check. `time_budget_s` stops
    growing the batch before the first size predicted to overrun that many seconds (the
    result says so). `clock` is the seconds source for every measurement (tests pass a
    simulated one to get exact answers).
    """
    started = clock()
    _check_arguments(warmup_steps, timed_steps, fraction, max_seconds_per_point)
    workload = resolve_workload(workload)
    variant_workloads = _variant_workloads(workload, variants)
    device = resolve_device(device)
    notes: list[str] = []
    grid, cap, cap_source = _plan_grid(workload, device, batch_sizes, max_batch_size, notes,
                                       min_batch_size)
    timing = dict(warmup_steps=warmup_steps, timed_steps=timed_steps,
                  max_seconds=max_seconds_per_point, clock=clock)

    with StateGuard(rng=True) as guard:
        trainer = _Trainer(workload, device, guard)
        deadline = None if time_budget_s is None else started + time_budget_s
        try:  # free the model and optimizer also on failure or Ctrl-C
            curve = _sweep(trainer, grid, fraction, early_stop, timing, deadline, clock, notes)
            if data_path and workload.data_loader is not None:
                sizes, pipeline_timing = _pipeline_plan(curve, timing, deadline, clock)
                pipeline = check_input_pipeline(
                    trainer.step, trainer.device_batches, workload.data_loader, device,
                    sizes, after_oom=trainer.drop_gradients, **pipeline_timing)
            elif data_path:
                pipeline = not_measured("the workload has no data_loader (its batches come "
                                        "from make_batch only)")
            else:
                pipeline = not_measured("data_path=False")
        finally:
            trainer.close()
        variant_results = []
        for name, (settings, variant_workload) in variant_workloads.items():
            logger.info("throughput variant %s", name)
            variant_trainer = _Trainer(variant_workload, device, guard)
            variant_notes: list[str] = []
            try:
                variant_curve = _sweep(variant_trainer, grid, fraction, early_stop, timing,
                                       clock=clock, notes=variant_notes)
                notes.extend(f"variant {name}: {note}" for note in variant_notes)
            except ProbeFailedError as exc:  # the main curve stands; say why this one is missing
                notes.append(f"variant {name} not measured: {exc}")
                continue
            finally:
                variant_trainer.close()
            variant_results.append(
                VariantResult(name, settings, variant_curve, curve.best_samples_per_s))

    return ThroughputResult(
        device=str(device),
        unit=workload.unit,
        curve=curve,
        model=curve.model(),
        grid=tuple(grid),
        max_batch_size=cap,
        max_batch_size_source=cap_source,
        input_pipeline=pipeline,
        variants=tuple(variant_results),
        seconds=clock() - started,
        warmup_steps=warmup_steps,
        timed_steps=timed_steps,
        notes=tuple(notes),
    )


def check_data_path(
    workload: Workload | str,
    batch_size: int,
    device: str | torch.device | None = None,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    timed_steps: int = DEFAULT_TIMED_STEPS,
    max_seconds_per_window: float | None = DEFAULT_MAX_SECONDS_PER_POINT,
    clock: Callable[[], float] = time.perf_counter,
) -> InputPipelineResult:
    """The input-pipeline check alone, at one batch size: the same training loop on
    device-resident batches, on `workload.data_loader`, and on device-resident batches again
    (see `probes.input_pipeline`), each window capped at `max_seconds_per_window`.

    `tune` runs it at the batch it recommends, the one the user will train at, rather than at
    the throughput knee, where a CPU loader can take seconds a batch."""
    batch_size = require_int("batch_size", batch_size)
    _check_steps(warmup_steps, timed_steps)
    _check_seconds_cap("max_seconds_per_window", max_seconds_per_window)
    workload = resolve_workload(workload)
    if workload.data_loader is None:
        return not_measured("the workload has no data_loader (its batches come from make_batch "
                            "only)")
    device = resolve_device(device)
    with StateGuard(rng=True) as guard:
        trainer = _Trainer(workload, device, guard)
        try:
            return check_input_pipeline(
                trainer.step, trainer.device_batches, workload.data_loader, device, [batch_size],
                warmup_steps=warmup_steps, timed_steps=timed_steps,
                max_seconds=max_seconds_per_window, after_oom=trainer.drop_gradients, clock=clock)
        finally:
            trainer.close()


def geometric_grid(cap: int, start: int = DEFAULT_MIN_BATCH_SIZE) -> list[int]:
    """Powers of two from `start` up to `cap`, then `cap` itself when it is clearly beyond
    the last one (a cap below `start` gives just `[cap]`)."""
    sizes = []
    size = start
    while size <= cap:
        sizes.append(size)
        size *= 2
    if not sizes or cap >= CAP_MIN_STEP * sizes[-1]:
        sizes.append(cap)
    return sizes


# -- internals --------------------------------------------------------------------------------


class _Trainer:
    """A model and optimizer built once from the workload (the model protected by the guard),
    and the one training step every measurement takes."""

    def __init__(self, workload: Workload, device: torch.device, guard: StateGuard) -> None:
        self.workload = workload
        self.device = device
        # The guard snapshots the (possibly user-owned) model before build_model changes it.
        self.model = build_model(workload, device, guard)
        self.optimizer = workload.build_optimizer(self.model.parameters(), workload.reference_lr)
        self.scaler = (torch.amp.GradScaler(device.type)
                       if needs_grad_scaler(workload, device) else None)

    def step(self, batch: Any) -> None:
        train_step(self.workload, self.model, self.optimizer, batch, self.device, self.scaler)

    def device_batches(self, batch_size: int) -> list[Any]:
        generator = torch.Generator(device="cpu").manual_seed(BATCH_SEED)
        return [self.workload.sample(batch_size, self.device, generator)
                for _ in range(BATCH_POOL_SIZE)]

    def drop_gradients(self) -> None:
        # After an OOM mid-step, gradients of the failed step may still hold memory.
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        del self.model, self.optimizer, self.scaler
        release_memory(self.device)


def _sweep(trainer: _Trainer, grid: Sequence[int], fraction: float, early_stop: bool,
           timing: dict[str, Any], deadline: float | None = None,
           clock: Callable[[], float] = time.perf_counter,
           notes: list[str] | None = None) -> Curve:
    points: list[ThroughputPoint] = []
    stop_reason = None
    oom_batch_size = None
    for batch_size in grid:
        if deadline is not None and points:
            cost = _predicted_point_seconds(points, batch_size, timing)
            left = deadline - clock()
            if cost > left:  # would overrun the budget: stop before, not after
                stop_reason = (f"time budget: batch size {batch_size} would take about "
                               f"{cost:.3g} s, {max(0.0, left):.3g} s left")
                logger.info("throughput: %s", stop_reason)
                break
        outcome = run_catching_oom(lambda: _measure_point(trainer, batch_size, timing),
                                   trainer.device)
        if outcome.oom:
            trainer.drop_gradients()
            if not points:
                raise ProbeFailedError(
                    f"no batch size could be measured: the smallest, {batch_size}, ran out of "
                    f"memory ({outcome.message}); free memory or pass smaller batch sizes")
            oom_batch_size = batch_size
            stop_reason = f"out of memory at batch size {batch_size} ({outcome.message})"
            logger.info("throughput: %s", stop_reason)
            break
        point = outcome.value
        points.append(point)
        logger.info("throughput: batch %d: %.1f samples/s (step %.4f s, spread %.2f)",
                    batch_size, point.samples_per_s, point.step_s, point.spread)
        rates = [p.samples_per_s for p in points]
        sizes = [p.batch_size for p in points]
        if (early_stop and batch_size != grid[-1]
                and has_flattened(sizes, rates, fraction, EARLY_STOP_PATIENCE)):
            stop_reason = (
                f"flattened: each of the last {EARLY_STOP_PATIENCE} batch sizes gained less "
                f"than {1 - fraction:.0%} samples/s over the best before it")
            break

    def affordable(point: ThroughputPoint) -> bool:
        cost = predicted_seconds(point.step_s, warmup_steps=timing["warmup_steps"],
                                 timed_steps=timing["timed_steps"],
                                 max_seconds=timing.get("max_seconds"))
        return deadline is None or cost <= deadline - clock()

    points, recheck_notes = remeasure_contradicted(
        points, lambda point: _measure_again(trainer, point, timing), affordable)
    if notes is not None:
        notes.extend(recheck_notes)
    return Curve(tuple(points), fraction, stop_reason, oom_batch_size)


def _measure_again(trainer: _Trainer, point: ThroughputPoint, timing: dict[str, Any]) -> ThroughputPoint:
    """`point`'s batch measured once more; `point` itself if it no longer fits (memory that
    something else held when the sweep passed may be gone, or the other way round)."""
    outcome = run_catching_oom(lambda: _measure_point(trainer, point.batch_size, timing),
                               trainer.device)
    if outcome.oom:
        trainer.drop_gradients()
        return point
    return outcome.value


def _predicted_point_seconds(points: Sequence[ThroughputPoint], batch_size: int,
                             timing: Mapping[str, Any]) -> float:
    """Seconds measuring `batch_size` should take: `time_steps`' run at a step time extrapolated
    along the line through the last two points (small batches often cost the same as each
    other, so scaling the last step time by the batch would stop a budgeted sweep far too
    soon), never below the last step time."""
    last = points[-1]
    step_s = last.step_s
    if len(points) >= 2:
        before = points[-2]
        slope = max(0.0, (last.step_s - before.step_s) / (last.batch_size - before.batch_size))
        step_s = last.step_s + slope * (batch_size - last.batch_size)
    return predicted_seconds(step_s, warmup_steps=timing["warmup_steps"],
                             timed_steps=timing["timed_steps"],
                             max_seconds=timing.get("max_seconds"))


def _measure_point(trainer: _Trainer, batch_size: int, timing: dict[str, Any]) -> ThroughputPoint:
    batches = trainer.device_batches(batch_size)
    units = float(np.mean([trainer.workload.units_in(batch, batch_size) for batch in batches]))
    times = time_steps(trainer.step, cycling(batches), trainer.device, **timing)
    return _point(batch_size, times, units, trainer.workload.unit)


def _point(batch_size: int, times: StepTimes, units: float, unit: str) -> ThroughputPoint:
    return ThroughputPoint(
        batch_size=batch_size,
        step_s=times.median_step_s,
        spread=times.spread,
        data_s=times.median_data_s,
        compute_s=times.median_compute_s,
        units_per_step=units,
        unit=unit,
        timed_steps=times.timed_steps,
        warmup_steps=times.warmup_steps,
    )


def _plan_grid(workload: Workload, device: torch.device, batch_sizes: Sequence[int] | None,
               max_batch_size: int | None, notes: list[str],
               min_batch_size: int | None = None) -> tuple[list[int], int, str]:
    if max_batch_size is not None:
        max_batch_size = require_int("max_batch_size", max_batch_size)
    start = DEFAULT_MIN_BATCH_SIZE if min_batch_size is None else require_int(
        "min_batch_size", min_batch_size)
    if batch_sizes is not None:
        sizes = _checked_batch_sizes(batch_sizes)
        if max_batch_size is not None:
            sizes = [size for size in sizes if size <= max_batch_size]
            if not sizes:
                raise UsageError(f"every batch size in {list(batch_sizes)} exceeds "
                                 f"max_batch_size={max_batch_size}; pass smaller sizes")
        return sizes, sizes[-1], "batch_sizes"
    if max_batch_size is not None:
        cap, source = max_batch_size, "max_batch_size"
    elif device.type != "cpu":
        from batchscope.probes.memory import probe_memory

        cap, source = int(probe_memory(workload, device=device).recommended_batch_size), \
            "memory probe"
    else:
        cap, source = DEFAULT_CPU_MAX_BATCH_SIZE, "CPU default"
        notes.append(f"grid capped at {cap}, the default on CPU without a memory budget; pass "
                     f"max_batch_size (--max-batch-size) to measure larger batches")
    if workload.dataset_size is not None and cap > workload.dataset_size:
        notes.append(f"grid capped at the dataset size {workload.dataset_size} (was {cap})")
        cap, source = workload.dataset_size, "dataset size"
    return geometric_grid(cap, start), cap, source


def _checked_batch_sizes(batch_sizes: Sequence[int]) -> list[int]:
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence) \
            or len(batch_sizes) == 0:
        raise UsageError(f"batch_sizes={batch_sizes!r} must be a non-empty list of positive "
                         f"integers, e.g. [32, 64, 128]")
    for size in batch_sizes:
        require_int("batch size", size)
    return sorted(set(int(size) for size in batch_sizes))


def _pipeline_plan(curve: Any, timing: dict[str, Any], deadline: float | None,
                   clock: Callable[[], float]) -> tuple[list[int], dict[str, Any]]:
    """Sizes and timing of the input-pipeline check. Within a time budget only the knee (the
    best size is often the memory limit, where a CPU loader takes seconds a batch) and each
    path capped to half of what is left, at least a second. (`tune` skips this and checks its
    own recommended batch with `check_data_path`.)"""
    if deadline is None:
        return [curve.knee_batch_size, curve.best_batch_size], timing
    left = max(2.0, deadline - clock()) / 2
    cap = timing.get("max_seconds")
    return [curve.knee_batch_size], {**timing, "max_seconds": left if cap is None else min(cap, left)}


def _check_arguments(warmup_steps: int, timed_steps: int, fraction: float,
                     max_seconds_per_point: float | None) -> None:
    _check_steps(warmup_steps, timed_steps)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction < 1:
        raise UsageError(f"fraction={fraction!r} must be strictly between 0 and 1, e.g. 0.95")
    _check_seconds_cap("max_seconds_per_point", max_seconds_per_point)


def _check_steps(warmup_steps: int, timed_steps: int) -> None:
    require_int("warmup_steps", warmup_steps, minimum=0, hint="3 is typical")
    require_int("timed_steps", timed_steps)


def _check_seconds_cap(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and value > 0):
        raise UsageError(f"{name}={value!r} must be a positive number of seconds or None "
                         f"(no cap)")


def _variant_workloads(workload: Workload, variants: bool | Mapping[str, Mapping[str, Any]]
                       ) -> dict[str, tuple[dict[str, Any], Workload]]:
    """{name: (settings, the workload with them)}, validated before anything is measured."""
    if variants is True:
        variants = DEFAULT_VARIANTS
    elif variants is False or variants is None:
        return {}
    if not isinstance(variants, Mapping) or not all(
            isinstance(settings, Mapping) for settings in variants.values()):
        raise UsageError(f"variants={variants!r} must be True, False or a mapping "
                         f"{{name: {{workload field: value}}}}, e.g. "
                         f"{{'bf16': {{'autocast_dtype': torch.bfloat16}}}}")
    built = {}
    for name, settings in variants.items():
        try:
            built[str(name)] = (dict(settings), workload.with_settings(**settings))
        except TypeError:
            unknown = sorted(set(settings) - set(Workload.__dataclass_fields__))
            raise UsageError(f"variant {name!r} sets {unknown or list(settings)}, which are not "
                             f"Workload fields; use e.g. autocast_dtype or channels_last"
                             ) from None
    return built
