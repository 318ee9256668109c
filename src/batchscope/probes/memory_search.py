"""Where to probe next when looking for the largest batch that fits (pure logic, no torch).

Peak training memory is close to affine in the batch size, `peak(B) = fixed + B * per_sample`
(weights, gradients and optimizer state are fixed; activations grow with B). So instead of
descending from a huge guess by a constant factor (Accelerate: x0.9 per OOM) or doubling up from
a small one (Lightning), the search measures the curve and jumps to where it crosses the budget:

1. **Calibrate.** Probe `start` (8 by default). If it fits with peak `p`, then under the affine
   model with `fixed >= 0` every sample costs at most `p / start`, so `floor(budget * start / p)`
   fits too: that guaranteed-safe size (or `2 * start`, if larger) is the second probe. It lies
   far from the first, which makes the slope well conditioned. (If `start` fails, halve until
   something fits.)
2. **Predict and verify.** Fit the line to every measured point (refit after each probe) and
   probe just under the predicted limit, `floor(limit * (1 - aim))`, so the verification usually
   fits. Then probe at the tolerance edge above it: if that fails the search is done.
3. **Refine.** Once a fit `lo` and a failure `hi` bracket the limit, probe the prediction inside
   the bracket (the secant through both ends when both peaks were measured: regula falsi),
   clamped to stay out of the tolerance zones at either end, until
   `hi - lo <= max(1, tolerance * lo)`. When `hi` failed although the model said it fits (an
   OOM before the budget is reached), one probe bets on "just below `hi`".

It must converge when the curve is not affine (a workspace switch at some B, allocator
rounding, noise, an OOM well below the budget). Two safeguards make sure it does:
- inside a bracket, a probe that did not at least halve the bracket is followed by a plain
  bisection, so the bracket halves at least every second probe;
- before any failure, a probe at the tolerance edge that unexpectedly fits doubles the step for
  the next one (exponential search), so an underestimating model cannot make it crawl.

Every proposal lies strictly between the largest fit and the smallest failure, so no size is
probed twice and the bracket only shrinks. The answer is always a size that was *measured* to
fit; sizes above the largest fit are never reported.

The line is fitted by least squares weighted by the batch size: points near the frontier matter
more than the calibration point at a tiny batch, which keeps a workspace jump at small B from
biasing the extrapolation to large B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

StopReason = Literal["converged", "capped", "no fit", "probe limit", "time budget"]

DEFAULT_TOLERANCE = 0.02
"""Stop when the gap between the largest fit and the smallest failure is at most 2% of the fit
(or 1): the result is then within 98-100% of the true limit, finer than the safety margin taken
off it for the recommendation, so more probes would buy nothing."""

DEFAULT_START = 8
DEFAULT_MAX_PROBES = 40


@dataclass(frozen=True)
class Observation:
    """One probe as the search sees it: did `batch_size` fit, and its measured peak (None when
    the run died before a peak could be read, e.g. an OOM)."""

    batch_size: int
    fits: bool
    peak_bytes: int | None


@dataclass(frozen=True)
class AffineMemoryModel:
    """`peak(B) = fixed_bytes + B * bytes_per_sample`."""

    fixed_bytes: float
    bytes_per_sample: float

    def peak_bytes(self, batch_size: int) -> float:
        return self.fixed_bytes + batch_size * self.bytes_per_sample

    def largest_batch_under(self, budget_bytes: int) -> int | None:
        """The largest B with `peak(B) <= budget` (0 when even B=1 exceeds it); None when the
        model does not grow with B, so it predicts nothing."""
        if self.bytes_per_sample <= 0:
            return None
        return max(0, math.floor((budget_bytes - self.fixed_bytes) / self.bytes_per_sample))


def fit_affine(
    points: Sequence[tuple[int, int]], weights: Sequence[float] | None = None
) -> AffineMemoryModel | None:
    """Weighted least-squares line through `(batch_size, peak_bytes)` points; None with fewer
    than two distinct batch sizes (a line needs two)."""
    if len({b for b, _ in points}) < 2:
        return None
    w = [1.0] * len(points) if weights is None else [float(x) for x in weights]
    total = sum(w)
    mean_b = sum(wi * b for wi, (b, _) in zip(w, points)) / total
    mean_p = sum(wi * p for wi, (_, p) in zip(w, points)) / total
    sxx = sum(wi * (b - mean_b) ** 2 for wi, (b, _) in zip(w, points))
    sxy = sum(wi * (b - mean_b) * (p - mean_p) for wi, (b, p) in zip(w, points))
    slope = sxy / sxx
    return AffineMemoryModel(fixed_bytes=mean_p - slope * mean_b, bytes_per_sample=slope)


def fit_observations(observations: Sequence[Observation]) -> AffineMemoryModel | None:
    """The memory curve from every probe with a measured peak (fits and over-budget ones),
    weighted by batch size (see the module docstring)."""
    points = [(o.batch_size, o.peak_bytes) for o in observations if o.peak_bytes is not None]
    return fit_affine(points, weights=[b for b, _ in points])


def tolerance_gap(largest_fit: int, tolerance: float) -> int:
    """The widest bracket `hi - lo` accepted as converged."""
    return max(1, math.floor(tolerance * largest_fit))


@dataclass
class LimitSearch:
    """Proposes batch sizes to probe; told the outcome of each through `record`.

    Use: `while (b := search.propose()) is not None: search.record(b, fits, peak)`. Then
    `largest_fit` is the answer (0 when nothing fit) and `stop_reason` says why it stopped.

    Args:
        budget_bytes: the peak a fitting batch may reach.
        tolerance: relative width of the final bracket (see `DEFAULT_TOLERANCE`).
        start: the first size probed.
        max_batch_size: an upper bound set by the caller (user limit, dataset size); the search
            stops with `stop_reason == "capped"` when this size fits.
        aim: how far under the predicted limit a verification probe aims; defaults to half the
            tolerance, so that when the model is right the probe at the tolerance edge above it
            fails and ends the search.
        max_probes: a safety net against a pathological curve; reaching it is reported
            (`stop_reason == "probe limit"`), never hidden.
    """

    budget_bytes: int
    tolerance: float = DEFAULT_TOLERANCE
    start: int = DEFAULT_START
    max_batch_size: int | None = None
    aim: float | None = None
    max_probes: int = DEFAULT_MAX_PROBES
    observations: list[Observation] = field(default_factory=list)
    stop_reason: StopReason | None = None
    _halve_next: bool = False
    _expansion_streak: int = 0
    _closed_from_above: bool = False

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ValueError(f"budget_bytes={self.budget_bytes} must be positive")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance={self.tolerance} must be in (0, 1)")
        if self.start < 1:
            raise ValueError(f"start={self.start} must be >= 1")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be >= 1")
        if self.aim is None:
            self.aim = self.tolerance / 2

    # -- state ------------------------------------------------------------------------------

    @property
    def largest_fit(self) -> int:
        return max((o.batch_size for o in self.observations if o.fits), default=0)

    @property
    def smallest_failure(self) -> int | None:
        """The smallest failure above the largest fit (the bracket's upper end)."""
        lo = self.largest_fit
        return min((o.batch_size for o in self.observations if not o.fits and o.batch_size > lo),
                   default=None)

    def model(self) -> AffineMemoryModel | None:
        return fit_observations(self.observations)

    # -- protocol ---------------------------------------------------------------------------

    def record(self, batch_size: int, fits: bool, peak_bytes: int | None) -> None:
        lo, hi = self.largest_fit, self.smallest_failure
        previous_gap = None if hi is None or lo == 0 else hi - lo
        self.observations.append(Observation(batch_size, fits, peak_bytes))
        new_hi = self.smallest_failure
        if previous_gap is not None and new_hi is not None:
            # A plain bisection leaves ceil(gap / 2): anything wider did not halve the bracket.
            self._halve_next = new_hi - self.largest_fit > (previous_gap + 1) // 2
        if new_hi is None and fits and self._predicted_to_fail(batch_size):
            self._expansion_streak += 1
        else:
            self._expansion_streak = 0

    def propose(self) -> int | None:
        """The next size to probe, or None when done (see `stop_reason`)."""
        if self.stop_reason is not None:
            return None
        lo, hi = self.largest_fit, self.smallest_failure
        if lo == 0 and hi == 1:
            return self._stop("no fit")
        if hi is not None and lo > 0 and hi - lo <= tolerance_gap(lo, self.tolerance):
            return self._stop("converged")
        if self.max_batch_size is not None and lo >= self.max_batch_size:
            return self._stop("capped")
        if len(self.observations) >= self.max_probes:
            return self._stop("probe limit")
        if lo == 0:
            target = self.start if hi is None else hi // 2
        elif hi is None:
            target = self._expand(lo)
        else:
            target = self._refine(lo, hi)
        if self.max_batch_size is not None:
            target = min(target, self.max_batch_size)
        upper = hi - 1 if hi is not None else target
        return max(min(target, upper), lo + 1, 1)

    # -- strategy ---------------------------------------------------------------------------

    def _expand(self, lo: int) -> int:
        """No failure yet: jump to just under the predicted limit, or to the tolerance edge."""
        # The tolerance edge: if it fails, the search is done. Each time it unexpectedly fits
        # the step doubles, so a model that underestimates cannot make the search crawl.
        edge = lo + tolerance_gap(lo, self.tolerance) * 2**self._expansion_streak
        model = self.model()
        if model is None:
            peak = self._peak_at(lo)
            if peak is None or peak <= 0:
                return max(edge, 2 * lo)
            # Affine with fixed >= 0 means per_sample <= peak / lo, so this size fits too. When
            # the fixed part dominates it is barely above `lo`; 2 * lo then gives the slope a
            # better-conditioned second point (and a failure there is a bracket, not a loss).
            return max(edge, 2 * lo, math.floor(self.budget_bytes * lo / peak))
        limit = model.largest_batch_under(self.budget_bytes)
        if limit is None:  # memory does not grow with B (as far as measured): keep growing
            return max(edge, 2 * lo)
        return max(edge, math.floor(limit * (1 - self.aim)))

    def _refine(self, lo: int, hi: int) -> int:
        """A bracket: the model's prediction inside it, with bisection as the safeguard."""
        middle = (lo + hi) // 2
        if self._halve_next:
            return middle
        model = self._bracket_model(lo, hi)
        limit = model.largest_batch_under(self.budget_bytes) if model is not None else None
        if limit is None:
            return middle
        if limit >= hi:
            # The model says `hi` fits, yet it failed (typically an OOM a little before the
            # budget: allocator overhead, fragmentation). Bet once on "a little" (the clamp
            # below makes it the lowest size whose success ends the search). Lost once, the
            # model is known to overshoot at the top, and bisection is the honest move.
            if self._closed_from_above:
                return middle
            self._closed_from_above = True
        # Never probe inside the tolerance zone at either end: a probe at the zone's edge ends
        # the search whenever a probe inside it would, and moves the bracket further otherwise.
        low_edge = lo + tolerance_gap(lo, self.tolerance)
        high_edge = math.ceil(hi / (1 + self.tolerance))
        if low_edge > high_edge:
            return middle
        return min(max(limit, low_edge), high_edge)

    def _bracket_model(self, lo: int, hi: int) -> AffineMemoryModel | None:
        """Inside a bracket whose ends both have measured peaks, the secant through them
        (regula falsi: the local slope, unaffected by a workspace jump below `lo`); otherwise
        the line through every measured point."""
        peak_lo, peak_hi = self._peak_at(lo), self._peak_at(hi)
        if peak_lo is not None and peak_hi is not None:
            local = fit_affine([(lo, peak_lo), (hi, peak_hi)])
            if local is not None and local.bytes_per_sample > 0:
                return local
        return self.model()

    def _predicted_to_fail(self, batch_size: int) -> bool:
        """Whether the model fitted *before* this probe put `batch_size` over the budget."""
        model = fit_observations(self.observations[:-1])
        return model is not None and model.peak_bytes(batch_size) > self.budget_bytes

    def _peak_at(self, batch_size: int) -> int | None:
        for o in self.observations:
            if o.batch_size == batch_size and o.peak_bytes is not None:
                return o.peak_bytes
        return None

    def stop_for_time(self) -> None:
        """The caller's time budget ran out: end with the largest verified fit so far."""
        if self.stop_reason is None and self.largest_fit > 0:
            self.stop_reason = "time budget"

    def _stop(self, reason: StopReason) -> None:
        self.stop_reason = reason
        return None


def run_search(
    measure: Callable[[int], Observation], search: LimitSearch
) -> LimitSearch:
    """Drive `search` with `measure(batch_size) -> Observation` until it stops."""
    while (batch_size := search.propose()) is not None:
        outcome = measure(batch_size)
        search.record(batch_size, outcome.fits, outcome.peak_bytes)
    return search
