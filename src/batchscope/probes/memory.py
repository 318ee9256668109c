"""The memory probe: the largest batch that fits, found with few real probes.

    result = batchscope.probe_memory("resnet18-cifar10", device="cuda")
    result.max_batch_size          # largest batch *verified* to fit (real training steps)
    result.recommended_batch_size  # that, minus the safety margin

How (details in `memory_search`): peak memory is close to affine in the batch size, so a couple
of small probes calibrate `peak(B) = fixed + B * per_sample`, the fit predicts where the budget
is crossed, a probe just under that verifies it, and a bracket between the largest verified fit
and the smallest failure is refined until it is within the tolerance. A curve that is not affine
only costs more probes. Each probe is a real training-step sequence (`memory_runner`).

The budget: on an accelerator the device's total memory unless `memory_budget` lowers it
(compared with the framework's peak allocation, everything this process holds on the device);
on CPU `memory_budget` is required and is compared with the peak resident memory of the steps
above the process's memory before the model was built (see `memory_runner`). A probe whose
peak exceeds the budget does not fit, even if nothing crashed.

Guarantees: the reported sizes were measured to fit (never extrapolated); the only upper bounds
are the user's `max_batch_size` and the dataset size (when the workload declares one), and the
result says when one of them stopped the search; the user's objects and every RNG are restored
(`StateGuard`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from batchscope import device as devices
from batchscope.checks import require_int, require_positive_number
from batchscope.errors import ProbeFailedError, UsageError
from batchscope.guard import StateGuard
from batchscope.probes.memory_runner import InProcessRunner, MemoryMeter, MemoryProbe, ProbePlan
from batchscope.probes.memory_search import (
    DEFAULT_MAX_PROBES,
    DEFAULT_START,
    DEFAULT_TOLERANCE,
    LimitSearch,
    fit_observations,
)
from batchscope.units import format_bytes, parse_size
from batchscope.workload import Workload, resolve_workload

# `parse_size` is re-exported: tuning.py, the CLI and the benchmarks import it from here.
__all__ = [
    "DEFAULT_MARGIN",
    "ROUNDING_THRESHOLD",
    "CappedBy",
    "MemoryProbeResult",
    "parse_size",
    "probe_memory",
    "recommended_batch_size",
]

logger = logging.getLogger(__name__)

DEFAULT_MARGIN = 0.10
"""Taken off the largest verified batch for the recommendation: headroom for what a few probe
steps do not see (allocator fragmentation over a long run, other processes, a periodic eval).
Not taken off an upper bound whose measured peak already leaves this share of the budget free:
the headroom is there in memory, where it matters."""

MIN_PROBES_ON_A_BUDGET = 2
"""A time budget ends the search only from this probe on. The first probe, at the start size,
says nothing about the limit (it also pays for the model build and the first data load, which
on a cold disk can take the whole budget); the second is extrapolated from it towards the
limit and is the most informative one. Stopping after one answers the start size itself: the
likely cause of a CPU `tune` test that once recommended batch 7 (8 minus the margin) right
after a cold start."""

ROUNDING_THRESHOLD = 64
"""Recommendations of at least this size are rounded down to a multiple of 8, the granularity
tensor cores and most kernels tile by; below it every example counts more than alignment."""

# "user max_batch_size", "dataset size", or the name a caller gives its max_batch_size
# (tune's is "batch giving 10 steps an epoch").
CappedBy = str
USER_CAP = "user max_batch_size"


@dataclass(frozen=True)
class MemoryProbeResult:
    """What the memory probe found.

    Attributes:
        max_batch_size: the largest batch verified to fit.
        recommended_batch_size: `max_batch_size` minus `margin`, rounded down (a multiple of 8
            from 64 up; never below 1, never above `max_batch_size`); when an upper bound
            (`capped_by`) stopped the search with more than `margin` of the budget still free
            at the bound, the bound itself.
        smallest_failure: the smallest batch seen not to fit (None if none failed).
        fixed_bytes / bytes_per_sample: the affine fit of the measured peaks (None with fewer
            than two measured sizes).
        probes: every probe, in the order run.
        seconds: wall time of the whole search.
        budget_bytes: the peak a fitting batch could reach.
        capped_by: which upper bound stopped the search, if one did (larger batches may fit).
        stop_reason: "converged", "capped" or "probe limit".
        note: one paragraph saying all of the above in words.
        recommended_is_bound: the recommendation is the bound in `capped_by` itself, taken
            without the margin because its measured peak left the margin's share free.
    """

    max_batch_size: int
    recommended_batch_size: int
    smallest_failure: int | None
    fixed_bytes: float | None
    bytes_per_sample: float | None
    probes: tuple[MemoryProbe, ...]
    seconds: float
    budget_bytes: int
    device: str
    margin: float
    tolerance: float
    capped_by: CappedBy | None
    stop_reason: str
    note: str
    recommended_is_bound: bool = False

    def predicted_peak_bytes(self, batch_size: int) -> float | None:
        """The fitted curve at `batch_size` (None without a fit)."""
        if self.fixed_bytes is None or self.bytes_per_sample is None:
            return None
        return self.fixed_bytes + batch_size * self.bytes_per_sample

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size,
            "recommended_batch_size": self.recommended_batch_size,
            "smallest_failure": self.smallest_failure,
            "bytes_per_sample": self.bytes_per_sample,
            "fixed_bytes": self.fixed_bytes,
            "probes": [probe.to_dict() for probe in self.probes],
            "seconds": self.seconds,
            "budget_bytes": self.budget_bytes,
            "device": self.device,
            "margin": self.margin,
            "tolerance": self.tolerance,
            "capped_by": self.capped_by,
            "stop_reason": self.stop_reason,
            "note": self.note,
            "recommended_is_bound": self.recommended_is_bound,
        }


def probe_memory(
    workload: Workload | str,
    *,
    device: str | torch.device | None = None,
    memory_budget: int | str | None = None,
    margin: float = DEFAULT_MARGIN,
    tolerance: float = DEFAULT_TOLERANCE,
    max_batch_size: int | None = None,
    start_batch_size: int = DEFAULT_START,
    steps: int = 2,
    eval_batch_factor: float | None = None,
    isolate: bool = False,
    workload_options: Mapping[str, Any] | None = None,
    max_probes: int = DEFAULT_MAX_PROBES,
    time_budget_s: float | None = None,
    meter: MemoryMeter | None = None,
    max_batch_size_reason: str = USER_CAP,
) -> MemoryProbeResult:
    """Find the largest batch whose training steps fit in memory.

    Args:
        workload: a `Workload`, a built-in name or a `package.module:function` entry point.
        device: where to probe (`None`/"auto": the best available).
        memory_budget: bytes or a size such as "4GiB", "512MB", "1.5G" (see
            `batchscope.units.parse_size`).
            Required on CPU; on an accelerator it lowers the budget from the total memory.
        margin: fraction taken off the largest fit for the recommendation, in [0, 1) (not off
            a bound whose peak leaves that share of the budget free; see DEFAULT_MARGIN).
        tolerance: stop when `smallest failure - largest fit <= max(1, tolerance * fit)`.
        max_batch_size: an upper bound of yours; the result says when it was reached.
        start_batch_size: the first size probed.
        steps: training steps per probe (>= 2: the first step allocates optimizer state).
        eval_batch_factor: also run an eval-mode forward under `no_grad` at
            `ceil(factor * B)` examples in every probe (e.g. 2.0 when evaluation uses twice
            the training batch); None skips it.
        isolate: run every probe in a fresh process, so that even the OS OOM killer only
            fails that probe; needs `workload` as a name or entry point.
        workload_options: options for a built-in workload given by name.
        max_probes: safety net for pathological memory curves (reaching it is reported).
        time_budget_s: stop refining once this many seconds have gone and answer with the
            largest verified fit so far (reported as stop_reason "time budget"); never before
            the second probe (see MIN_PROBES_ON_A_BUDGET).
        meter: how peak memory is read (testing hook); default: the device's counters.
        max_batch_size_reason: what `max_batch_size` stands for, as `capped_by` and the note
            name it when it stops the search (tune passes its own cap's reason).

    Raises:
        UsageError: bad arguments (no budget on CPU, isolate with a Workload object...).
        ProbeFailedError: not even batch size 1 fits.
    """
    max_batch_size, start_batch_size, steps, max_probes = _check_arguments(
        margin, tolerance, max_batch_size, start_batch_size, steps, eval_batch_factor, max_probes
    )
    if isolate and not isinstance(workload, str):
        raise UsageError(
            "isolate=True needs the workload as a built-in name or 'package.module:function' "
            "entry point, so that each probe's process can rebuild it"
        )
    if isolate and meter is not None:
        raise UsageError("isolate=True measures memory in the child processes; drop meter=")
    options = dict(workload_options or {})
    if options and isinstance(workload, Workload):
        raise UsageError(
            f"workload_options {sorted(options)} apply to a workload given by name; set them "
            f"on the Workload object instead"
        )
    resolved = resolve_workload(workload, **options)
    where = devices.resolve_device(device)
    budget = _resolve_budget(memory_budget, where, default_meter=meter is None)
    cap, cap_source = _upper_bound(max_batch_size, max_batch_size_reason, resolved.dataset_size)
    plan = ProbePlan(budget_bytes=budget, steps=steps, eval_batch_factor=eval_batch_factor)
    start = start_batch_size if cap is None else min(start_batch_size, cap)
    search = LimitSearch(budget, tolerance=tolerance, start=start, max_batch_size=cap,
                         max_probes=max_probes)
    started = time.perf_counter()
    probes: list[MemoryProbe] = []
    with StateGuard(rng=True) as guard:
        runner = _make_runner(isolate, workload, options, resolved, where, plan, guard, meter,
                              warm_batch_size=min(search.start, 2))
        try:
            while (batch_size := search.propose()) is not None:
                probe = runner.probe(batch_size)
                probes.append(probe)
                search.record(batch_size, probe.fits, probe.peak_bytes)
                if (time_budget_s is not None and len(probes) >= MIN_PROBES_ON_A_BUDGET
                        and time.perf_counter() - started > time_budget_s):
                    search.stop_for_time()
                logger.info("memory probe: batch %d %s (peak %s, %.2fs)", batch_size,
                            probe.reason, "-" if probe.peak_bytes is None
                            else format_bytes(probe.peak_bytes), probe.seconds)
        finally:
            runner.close()
    seconds = time.perf_counter() - started
    return _result(search, probes, seconds, budget, where, margin, tolerance, cap_source)


def recommended_batch_size(max_batch_size: int, margin: float) -> int:
    """`max_batch_size` minus the margin, rounded down to a multiple of 8 from
    `ROUNDING_THRESHOLD` up, never below 1 (so never above `max_batch_size` either)."""
    size = math.floor(max_batch_size * (1 - margin))
    if size >= ROUNDING_THRESHOLD:
        size -= size % 8
    return max(1, min(size, max_batch_size))


# -- internals ---------------------------------------------------------------------------------


def _check_arguments(
    margin: float, tolerance: float, max_batch_size: int | None, start: int, steps: int,
    eval_batch_factor: float | None, max_probes: int,
) -> tuple[int | None, int, int, int]:
    """Refuses bad arguments before anything runs; returns the integer ones as plain ints
    (a numpy integer is accepted, and must not leak into the JSON of an isolated probe)."""
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise UsageError(f"margin={margin!r} must be in [0, 1), e.g. 0.1 for 10%")
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise UsageError(f"tolerance={tolerance!r} must be in (0, 1), e.g. 0.02 for 2%")
    if eval_batch_factor is not None:
        require_positive_number("eval_batch_factor", eval_batch_factor,
                                hint="e.g. 2.0 when evaluation uses twice the training batch")
    return (
        None if max_batch_size is None else require_int("max_batch_size", max_batch_size),
        require_int("start_batch_size", start),
        require_int("steps", steps, minimum=2, hint="the first step allocates the optimizer state"),
        require_int("max_probes", max_probes),
    )


def _resolve_budget(
    memory_budget: int | str | None, device: torch.device, *, default_meter: bool
) -> int:
    if memory_budget is not None:
        budget = parse_size(memory_budget)
        if default_meter and device.type == "cpu":  # a test's fake meter may model any device
            _refuse_budget_above_ram(budget, devices.total_memory_bytes(device))
    elif device.type == "cpu":
        raise UsageError(
            "a memory budget is required on CPU (nothing runs out of memory there before the "
            "whole machine does); pass --memory-budget / memory_budget=, e.g. 4GiB"
        )
    else:
        budget = devices.total_memory_bytes(device)
    if default_meter and device.type == "cpu" and not devices.supports_peak_reset(device):
        raise UsageError(
            "peak memory cannot be measured per probe on this system (needs Linux's "
            "/proc/self/clear_refs); probe on an accelerator instead"
        )
    return budget


def _refuse_budget_above_ram(budget: int, ram: int) -> None:
    # Nothing fails on CPU before the whole machine runs out: a search under a budget the RAM
    # cannot hold climbs until the allocator fails or the OS OOM killer ends the process.
    if budget > ram:
        raise UsageError(
            f"memory budget {format_bytes(budget)} is more than this machine's RAM "
            f"({format_bytes(ram)}); pass --memory-budget / memory_budget= of at most "
            f"{format_bytes(ram)}, less what else runs on it"
        )


def _upper_bound(
    max_batch_size: int | None, reason: str, dataset_size: int | None
) -> tuple[int | None, CappedBy | None]:
    bounds: list[tuple[int, CappedBy]] = []
    if max_batch_size is not None:
        bounds.append((max_batch_size, reason))
    if dataset_size is not None:
        bounds.append((dataset_size, "dataset size"))
    if not bounds:
        return None, None
    return min(bounds, key=lambda bound: bound[0])  # ties: the user's own bound is named


def _make_runner(
    isolate: bool, spec: Workload | str, options: dict[str, Any], workload: Workload,
    device: torch.device, plan: ProbePlan, guard: StateGuard, meter: MemoryMeter | None,
    warm_batch_size: int,
) -> Any:
    if isolate:
        from batchscope.probes.memory_isolation import IsolatedRunner

        return IsolatedRunner(str(spec), options, device, plan, warm_batch_size)
    return InProcessRunner(workload, device, plan, guard, meter, warm_batch_size)


def _result(
    search: LimitSearch, probes: list[MemoryProbe], seconds: float, budget: int,
    device: torch.device, margin: float, tolerance: float, cap_source: CappedBy | None,
) -> MemoryProbeResult:
    largest = search.largest_fit
    if largest == 0:
        last = probes[-1]
        raise ProbeFailedError(
            f"not even batch size {last.batch_size} fits in the budget of "
            f"{format_bytes(budget)} on {device}: {last.reason}"
        )
    model = fit_observations(search.observations)
    capped_by = cap_source if search.stop_reason == "capped" else None
    recommended = recommended_batch_size(largest, margin)
    cap_peak = _peak_of(probes, largest) if capped_by is not None else None
    # The margin guards the memory edge; a bound unrelated to memory stopped the search before
    # it, with at least the margin's share of the budget still free at the bound.
    at_bound = cap_peak is not None and cap_peak <= (1 - margin) * budget
    if at_bound:
        recommended = largest
    return MemoryProbeResult(
        max_batch_size=largest,
        recommended_batch_size=recommended,
        smallest_failure=search.smallest_failure,
        fixed_bytes=None if model is None else model.fixed_bytes,
        bytes_per_sample=None if model is None else model.bytes_per_sample,
        probes=tuple(probes),
        seconds=seconds,
        budget_bytes=budget,
        device=str(device),
        margin=margin,
        tolerance=tolerance,
        capped_by=capped_by,
        stop_reason=str(search.stop_reason),
        note=_note(search, len(probes), budget, recommended, margin, capped_by, at_bound),
        recommended_is_bound=at_bound,
    )


def _peak_of(probes: list[MemoryProbe], batch_size: int) -> int | None:
    return next((p.peak_bytes for p in probes if p.batch_size == batch_size and p.fits), None)


def _note(
    search: LimitSearch, probe_count: int, budget: int, recommended: int, margin: float,
    capped_by: CappedBy | None, at_bound: bool,
) -> str:
    largest, failure = search.largest_fit, search.smallest_failure
    parts = [f"Batch {largest} was verified to fit in {format_bytes(budget)} "
             f"({probe_count} probes)."]
    if search.stop_reason == "converged":
        parts.append(f"Batch {failure} did not fit, so the limit is found within "
                     f"{failure - largest} examples (tolerance {search.tolerance:.0%}).")
    elif capped_by is not None:
        parts.append(f"The search stopped at the {capped_by} ({largest}); larger batches may "
                     f"fit but were not tried.")
    elif search.stop_reason == "time budget":
        above = f"below {failure}" if failure is not None else "higher (no failure seen yet)"
        parts.append(f"The time budget ran out before the tolerance was reached: the true limit "
                     f"may be {above}.")
    elif search.stop_reason == "probe limit":
        above = (f"between {largest} and {failure}" if failure is not None
                 else f"above {largest} (no failure seen)")
        parts.append(f"The probe limit ({search.max_probes}) was reached before the tolerance: "
                     f"the limit lies {above}.")
    if at_bound:
        parts.append(f"Recommended: {recommended}, the bound itself: its peak left more than "
                     f"the {margin:.0%} margin of the budget free.")
        return " ".join(parts)
    rounding = " rounded down to a multiple of 8" if recommended >= ROUNDING_THRESHOLD else ""
    parts.append(f"Recommended: {recommended} ({largest} minus the {margin:.0%} "
                 f"margin{rounding}).")
    return " ".join(parts)
