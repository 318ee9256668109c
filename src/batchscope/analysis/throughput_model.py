"""Step time as a function of batch size, and the knee of the throughput curve.

The model. Measured step times are the best evidence there is, so inside the measured range the
model *is* the measurements (medians of repeats), joined by straight lines. A single global formula
would be wrong somewhere: on a GPU small batches are latency-bound (t(B) is nearly flat: kernels
too small to fill the device), large ones are bandwidth/compute-bound (t(B) grows about linearly),
and the bend between them is gradual, so neither `a + b*B` fitted to every point nor
`max(a, a' + b*B)` fits the bend; both would move the knee.

Outside the measured range we must extrapolate, and do it conservatively:
- above the largest measured batch, affine: the slope `b` (seconds per extra sample at
  saturation) is a least-squares fit of `a + b*B` on the last few points only (the saturated
  regime), weighted by relative error because timing noise scales with t; the line is anchored at
  the last measurement so the curve stays continuous. If that slope is not positive (noise, or a
  device still latency-bound at the top of the grid) we refuse to promise throughput we never saw
  and extrapolate at constant throughput instead.
- below the smallest measured batch, the line through the first two points, clipped into what
  physics allows: step time no larger than at the first point (less work cannot take longer) and
  throughput no larger than there (the device cannot get *more* efficient with less work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from batchscope.analysis._checks import (
    finite_or_none,
    fraction_in_open_unit,
    positive_array,
    positive_int,
    same_length,
)
from batchscope.errors import UsageError

# The upper fit uses this many of the largest measured batch sizes: on a doubling grid the last
# three span a factor of 4, enough to see the slope, few enough to stay in the saturated regime.
DEFAULT_UPPER_POINTS = 3


@dataclass(frozen=True)
class ThroughputModel:
    """Step time t(B): measured points joined linearly, affine beyond them (see module docstring)."""

    batch_sizes: tuple[float, ...]
    measured_step_seconds: tuple[float, ...]
    intercept_s: float
    seconds_per_sample: float
    low_slope: float
    fit_points: int
    relative_rmse: float
    extrapolation: str  # "affine" or "constant_throughput"

    def step_seconds(self, batch_size: Any) -> Any:
        """Predicted seconds per optimizer step at `batch_size` (scalar -> float, array -> array)."""
        batch = _batch_array(batch_size)
        xs = np.asarray(self.batch_sizes)
        ts = np.asarray(self.measured_step_seconds)
        times = np.interp(batch, xs, ts)
        above = batch > xs[-1]
        times[above] = ts[-1] + self.seconds_per_sample * (batch[above] - xs[-1])
        below = batch < xs[0]
        line = ts[0] + self.low_slope * (batch[below] - xs[0])
        times[below] = np.clip(line, ts[0] * batch[below] / xs[0], ts[0])
        return float(times[0]) if np.ndim(batch_size) == 0 else times

    def samples_per_s(self, batch_size: Any) -> Any:
        """Predicted samples per second at `batch_size` (scalar -> float, array -> array)."""
        batch = _batch_array(batch_size)
        rate = batch / np.asarray(self.step_seconds(batch))
        return float(rate[0]) if np.ndim(batch_size) == 0 else rate

    def is_extrapolated(self, batch_size: float) -> bool:
        """True when `batch_size` lies outside the measured range (the prediction is a model's)."""
        return not (self.batch_sizes[0] <= float(batch_size) <= self.batch_sizes[-1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": "measured points joined linearly; affine extrapolation",
            "batch_sizes": list(self.batch_sizes),
            "step_seconds": list(self.measured_step_seconds),
            "intercept_s": finite_or_none(self.intercept_s),
            "seconds_per_sample": finite_or_none(self.seconds_per_sample),
            "asymptotic_samples_per_s": finite_or_none(1.0 / self.seconds_per_sample),
            "fit_points": self.fit_points,
            "relative_rmse": finite_or_none(self.relative_rmse),
            "extrapolation": self.extrapolation,
        }


def fit_affine(batch_sizes: Any, step_seconds: Any, weights: Any = None) -> tuple[float, float, float]:
    """Least-squares `t = a + b*B` minimising sum(w * ((t - a - b*B) / t)**2).

    Dividing by t weights each point by its relative error: a 2 ms step measured to 2% and a
    2 s step measured to 2% should count the same. Returns (a, b, relative RMS residual).
    """
    batch = positive_array("batch_sizes", batch_sizes)
    times = positive_array("step_seconds", step_seconds)
    same_length("batch_sizes", batch, "step_seconds", times)
    extra = np.ones_like(times) if weights is None else positive_array("weights", weights)
    same_length("batch_sizes", batch, "weights", extra)
    if np.unique(batch).size < 2:
        raise UsageError("fit_affine needs at least two distinct batch sizes; measure another one")
    root_w = np.sqrt(extra) / times
    design = np.column_stack([np.ones_like(batch), batch]) * root_w[:, None]
    (intercept, slope), *_ = np.linalg.lstsq(design, times * root_w, rcond=None)
    relative = (times - intercept - slope * batch) / times
    rmse = float(np.sqrt(np.average(relative**2, weights=extra)))
    return float(intercept), float(slope), rmse


def fit_throughput_model(
    batch_sizes: Any,
    step_seconds: Any,
    weights: Any = None,
    *,
    upper_points: int = DEFAULT_UPPER_POINTS,
) -> ThroughputModel:
    """Build the step-time model from measurements (repeats of a batch size are median-pooled).

    `weights` (optional, one per measurement, e.g. repeat counts) scale each point in the upper
    affine fit on top of the relative-error weighting.
    """
    batch = positive_array("batch_sizes", batch_sizes)
    times = positive_array("step_seconds", step_seconds)
    same_length("batch_sizes", batch, "step_seconds", times)
    extra = np.ones_like(times) if weights is None else positive_array("weights", weights)
    same_length("batch_sizes", batch, "weights", extra)
    upper_points = max(2, positive_int("upper_points", upper_points))
    xs, ts = _median_per_batch(batch, times)
    ws = np.array([extra[batch == x].sum() for x in xs])

    if xs.size == 1:  # one point: nothing to fit, so assume constant throughput both ways
        per_sample = ts[0] / xs[0]
        return ThroughputModel((float(xs[0]),), (float(ts[0]),), 0.0, per_sample, per_sample, 1, 0.0,
                               "constant_throughput")

    top = slice(max(0, xs.size - upper_points), None)
    intercept, slope, rmse = fit_affine(xs[top], ts[top], ws[top])
    extrapolation = "affine"
    if slope <= 0:
        slope, extrapolation = ts[-1] / xs[-1], "constant_throughput"
    low_slope = (ts[1] - ts[0]) / (xs[1] - xs[0])
    return ThroughputModel(
        batch_sizes=tuple(float(x) for x in xs),
        measured_step_seconds=tuple(float(t) for t in ts),
        intercept_s=intercept,
        seconds_per_sample=float(slope),
        low_slope=float(low_slope),
        fit_points=int(xs[top].size),
        relative_rmse=rmse,
        extrapolation=extrapolation,
    )


KNEE_FRACTION = 0.95
"""The knee: the smallest batch size reaching this share of the best throughput."""


def knee_batch_size(batch_sizes: Any, samples_per_s: Any, fraction: float = KNEE_FRACTION) -> int:
    """Smallest MEASURED batch size whose throughput is >= `fraction` x the best measured.

    Past the knee, a bigger batch buys little speed but still costs statistical efficiency and
    memory, so the knee is where the throughput argument for growing the batch runs out.
    """
    fraction = fraction_in_open_unit("fraction", fraction)
    xs, rates = _measured_curve(batch_sizes, samples_per_s)
    return int(xs[np.argmax(rates >= fraction * rates.max())])


def best_batch_size(batch_sizes: Any, samples_per_s: Any) -> int:
    """The measured batch size with the highest throughput (the smallest one on a tie)."""
    xs, rates = _measured_curve(batch_sizes, samples_per_s)
    return int(xs[np.argmax(rates)])


def has_flattened(batch_sizes: Any, samples_per_s: Any, fraction: float = KNEE_FRACTION, patience: int = 2) -> bool:
    """Early-stop rule for a growing (e.g. doubling) grid: True when each of the last `patience`
    points gained less than (1 - fraction) relative over the best throughput before it.

    Requiring `patience` consecutive small gains keeps one noisy timing from ending the search.
    """
    fraction = fraction_in_open_unit("fraction", fraction)
    patience = positive_int("patience", patience)
    xs, rates = _measured_curve(batch_sizes, samples_per_s)
    if rates.size < patience + 1:
        return False
    for index in range(rates.size - patience, rates.size):
        best_before = rates[:index].max()
        if rates[index] / best_before - 1.0 >= 1.0 - fraction:
            return False
    return True


def _measured_curve(batch_sizes: Any, samples_per_s: Any) -> tuple[np.ndarray, np.ndarray]:
    batch = positive_array("batch_sizes", batch_sizes)
    rates = positive_array("samples_per_s", samples_per_s)
    same_length("batch_sizes", batch, "samples_per_s", rates)
    return _median_per_batch(batch, rates)


def _median_per_batch(batch: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique batch sizes ascending, with the median of the values measured at each (robust to
    one slow repeat, e.g. a GC pause or a neighbour's job)."""
    xs = np.unique(batch)
    return xs, np.array([np.median(values[batch == x]) for x in xs])


def _batch_array(batch_size: Any) -> np.ndarray:
    batch = np.atleast_1d(np.asarray(batch_size, dtype=float))
    if batch.ndim != 1 or not np.all(np.isfinite(batch)) or np.any(batch <= 0):
        raise UsageError(f"batch_size={batch_size!r} must be positive finite number(s)")
    return batch
