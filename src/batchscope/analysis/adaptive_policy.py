"""When to change the batch during training, and to what. No torch.

The gradient noise scale grows as training proceeds (McCandlish et al. 2018, fig. 4: the loss
falls, the gradient shrinks, its noise does not), so the goodput-optimal batch grows with it
(Pollux, OSDI 2021, re-plans the batch as it goes). `BatchSizePolicy.decide` re-runs the goodput
plan (`analysis.goodput`) with the noise scale measured now and moves the batch toward that
optimum, with three brakes:

- growth only, by default: the optimum falls only if the noise scale falls, which during
  training is more often a noisy estimate or a loss spike than a real change, and shrinking
  the batch means cutting the LR in the middle of a run;
- at most `max_growth` times the current batch per change: the LR moves with the batch, and
  one large jump of both is what the warmup at the start of training exists to avoid;
- only for a predicted gain of at least `min_gain` in time to target: near the optimum
  neighbouring batches are within a few percent of each other, and a noisy estimate would
  otherwise flip between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from batchscope.analysis._checks import positive_int, positive_number
from batchscope.analysis.goodput import StepTimeModel, plan_batch_size
from batchscope.errors import UsageError

# A measured step runs as (at least) two equal micro-batches, the estimate's second batch size.
# Where a step is launch-bound that split costs about a second step: ResNet-18 / CIFAR-10 at
# batch 512 in bf16 on an H200 took 20.2 and 22.3 ms a measured step against 10.4 and 10.2 ms a
# plain one in two runs, about +11% of training time at one step in 10
# (benchmarks/adaptive_overhead.py). `measurement_interval` spaces measured steps so that the
# split's cost predicted by tune's throughput model stays under this share of training time.
# The model sees only the split, not the host sync of reading the numbers, which in that
# launch-bound loop cost about as much again: there it predicted +54% a measured step (1 in 18).
MAX_MEASURE_OVERHEAD = 0.03
MEASURE_EVERY_FLOOR = 10  # the monitor's default: never measured more often than this
MEASURE_EVERY_CEILING = 100  # and never less often: the noise scale must still be followed


@dataclass(frozen=True)
class BatchDecision:
    """The batch to train with next; `optimum` is the plan's unbraked answer (None without a
    usable noise scale) and `predicted_gain` the predicted time-to-target saving of the change
    (time at the previous batch / time at the new one - 1; 0.0 when nothing changed)."""

    previous: int
    batch_size: int
    micro_batch_size: int
    accumulation: int
    noise_scale: float | None
    optimum: int | None
    predicted_gain: float
    reason: str

    @property
    def changed(self) -> bool:
        return self.batch_size != self.previous

    def to_dict(self) -> dict[str, Any]:
        return {
            "previous": self.previous, "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size, "accumulation": self.accumulation,
            "noise_scale": self.noise_scale, "optimum": self.optimum,
            "predicted_gain": self.predicted_gain, "reason": self.reason,
        }


class BatchSizePolicy:
    """Goodput-driven batch changes with the brakes of the module docstring.

    Args:
        step_time: seconds per step of one micro-batch, as a function of its size (a fitted
            `ThroughputModel`).
        candidates: global batch sizes the policy may move to (tune's plan uses powers of two
            plus the memory limit and the reference).
        max_fit_batch_size: the largest micro-batch that fits; larger batches are accumulated.
        reference_batch_size: the batch the workload's LR was tuned at (plan times are relative
            to it; it does not limit the policy).
        examples_slack: tune's "examples" target: only batches up to this share of the noise
            scale measured now (examples to target within 1 + slack of the minimum) are
            candidates, so the batch grows as the noise scale does; None for the "time" target.
        sync_seconds: the gradient all-reduce's seconds per optimizer step under DDP, added to
            each step's time (`plan_batch_size`); 0 on one device or when not measured.
    """

    def __init__(
        self,
        step_time: StepTimeModel,
        candidates: Iterable[int],
        *,
        max_fit_batch_size: int,
        reference_batch_size: int,
        max_accumulation: int = 16,
        max_growth: float = 2.0,
        min_gain: float = 0.05,
        allow_shrink: bool = False,
        examples_slack: float | None = None,
        sync_seconds: float = 0.0,
    ) -> None:
        self.step_time = step_time
        # The gradient all-reduce per optimizer step under DDP (tune measures it on every rank).
        self.sync_seconds = sync_seconds
        self.candidates = sorted({positive_int("candidate batch size", c) for c in candidates})
        if not self.candidates:
            raise UsageError("candidates is empty; pass the batch sizes the policy may choose from")
        self.max_fit = positive_int("max_fit_batch_size", max_fit_batch_size)
        self.reference = positive_int("reference_batch_size", reference_batch_size)
        self.max_accumulation = positive_int("max_accumulation", max_accumulation)
        growth = positive_number("max_growth", max_growth)
        if growth <= 1.0:
            raise UsageError(f"max_growth={max_growth!r} must be above 1 (2.0 allows doubling per change)")
        self.max_growth = growth
        if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < 1:
            raise UsageError(f"min_gain={min_gain!r} must be a fraction in [0, 1), e.g. 0.05")
        self.min_gain = float(min_gain)
        self.allow_shrink = bool(allow_shrink)
        self.examples_slack = None if examples_slack is None else positive_number(
            "examples_slack", examples_slack)

    def decide(self, current: int, noise_scale: float | None) -> BatchDecision:
        """The batch to use from now on, given the batch in use and the noise scale measured now."""
        current = positive_int("current batch size", current)
        noise = _usable(noise_scale)
        if noise is None:
            return self._keep(current, None, None, "no usable noise-scale estimate yet")
        plan = plan_batch_size(
            sorted({*self._eligible(noise), current}), self.step_time, noise,
            max_fit_batch_size=self.max_fit, reference_batch_size=self.reference,
            max_accumulation=max(self.max_accumulation, math.ceil(current / self.max_fit)),
            sync_seconds=self.sync_seconds)
        times = {p.batch_size: p.relative_time for p in plan.curve if p.relative_time is not None}
        optimum = plan.batch_size
        if optimum == current:
            return self._keep(current, noise, optimum, "the batch in use is the optimum")
        if optimum < current and not self.allow_shrink:
            return self._keep(current, noise, optimum, f"the optimum ({optimum}) is smaller; growth only")
        if optimum > current:
            reachable = [b for b in times if current < b <= current * self.max_growth]
        else:
            reachable = [b for b in times if current / self.max_growth <= b < current]
        if not reachable:
            return self._keep(current, noise, optimum,
                              f"no candidate between {current} and the optimum {optimum} within "
                              f"{self.max_growth:g}x of it")
        step_to = min(reachable, key=lambda b: (times[b], b))
        gain = times[current] / times[step_to] - 1.0
        if gain < self.min_gain:
            return self._keep(current, noise, optimum,
                              f"moving to {step_to} would save {gain:.1%}, under min_gain {self.min_gain:.0%}")
        point = next(p for p in plan.curve if p.batch_size == step_to)
        return BatchDecision(
            previous=current, batch_size=step_to, micro_batch_size=int(point.micro_batch_size),
            accumulation=int(point.accumulation), noise_scale=noise, optimum=optimum,
            predicted_gain=gain,
            reason=f"noise scale {noise:.0f}: batch {step_to} is predicted {gain:.1%} faster to "
                   f"target than {current} (optimum {optimum})")

    def _eligible(self, noise: float) -> list[int]:
        if self.examples_slack is None:
            return self.candidates
        return [c for c in self.candidates if c <= self.examples_slack * noise] or self.candidates[:1]

    def split(self, batch_size: int) -> tuple[int, int]:
        """(micro_batch_size, accumulation) for a global batch: the fewest micro-batches that fit."""
        batch = positive_int("batch_size", batch_size)
        steps = math.ceil(batch / self.max_fit)
        return math.ceil(batch / steps), steps

    def measurement_interval(self, batch_size: int, max_overhead: float = MAX_MEASURE_OVERHEAD) -> int:
        """Measure one step in this many at `batch_size` on one device: the extra time of a
        measured step (its split into max(2, accumulation) equal micro-batches, from the step
        time model) over `max_overhead` of a plain step's, rounded up, within
        [MEASURE_EVERY_FLOOR, MEASURE_EVERY_CEILING]. E.g. plain 10 ms, measured 16 ms: 0.6 / 0.03
        = 20 steps."""
        batch = positive_int("batch_size", batch_size)
        share = positive_number("max_overhead", max_overhead)
        micro, steps = self.split(batch)
        plain = steps * float(self.step_time.step_seconds(micro))
        parts = max(2, steps)
        measured = parts * float(self.step_time.step_seconds(math.ceil(batch / parts)))
        if not (math.isfinite(plain) and math.isfinite(measured)) or plain <= 0:
            return MEASURE_EVERY_FLOOR
        extra = max(0.0, measured / plain - 1.0)
        return min(MEASURE_EVERY_CEILING, max(MEASURE_EVERY_FLOOR, math.ceil(extra / share - 1e-9)))

    def _keep(self, current: int, noise: float | None, optimum: int | None, reason: str) -> BatchDecision:
        micro, steps = self.split(current)
        return BatchDecision(current, current, micro, steps, noise, optimum, 0.0, reason)


def _usable(noise_scale: float | None) -> float | None:
    if noise_scale is None or isinstance(noise_scale, bool):
        return None
    value = float(noise_scale)
    return value if math.isfinite(value) and value > 0 else None
