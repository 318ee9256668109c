"""The throughput probe's results: points, curves (main and variants) and the whole result.

Everything a report needs is here and in `to_dict()` (the `throughput` section of a run record);
the knee, best size and model are derived from the measured points on demand, so a result
cannot disagree with its own data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from batchscope.analysis.throughput_model import (
    ThroughputModel,
    best_batch_size,
    fit_throughput_model,
    knee_batch_size,
)
from batchscope.probes.input_pipeline import InputPipelineResult


@dataclass(frozen=True)
class ThroughputPoint:
    """One batch size, measured with device-resident batches."""

    batch_size: int
    step_s: float
    """Median seconds per training step (data + compute)."""
    spread: float
    """Inter-quartile range of the step times over their median."""
    data_s: float
    compute_s: float
    units_per_step: float
    """Examples or tokens per step (the workload's `unit`)."""
    unit: str
    timed_steps: int
    warmup_steps: int

    @property
    def samples_per_s(self) -> float:
        return self.batch_size / self.step_s

    @property
    def units_per_s(self) -> float:
        return self.units_per_step / self.step_s

    def to_dict(self) -> dict[str, Any]:
        data = {
            "batch_size": self.batch_size,
            "samples_per_s": self.samples_per_s,
            "step_s": self.step_s,
            "spread": _finite_or_none(self.spread),
            "data_s": self.data_s,
            "compute_s": self.compute_s,
            "timed_steps": self.timed_steps,
            "warmup_steps": self.warmup_steps,
        }
        if self.unit == "tokens":
            data["tokens_per_s"] = self.units_per_s
            data["tokens_per_step"] = self.units_per_step
        return data


@dataclass(frozen=True)
class Curve:
    """A measured throughput curve and what it says (shared by the main run and variants)."""

    points: tuple[ThroughputPoint, ...]
    fraction: float
    stop_reason: str | None
    oom_batch_size: int | None

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason is not None

    @property
    def batch_sizes(self) -> list[int]:
        return [point.batch_size for point in self.points]

    @property
    def samples_per_s(self) -> list[float]:
        return [point.samples_per_s for point in self.points]

    @property
    def knee_batch_size(self) -> int:
        return knee_batch_size(self.batch_sizes, self.samples_per_s, self.fraction)

    @property
    def best_batch_size(self) -> int:
        return best_batch_size(self.batch_sizes, self.samples_per_s)

    @property
    def best_samples_per_s(self) -> float:
        return max(self.samples_per_s)

    def model(self) -> ThroughputModel:
        return fit_throughput_model(self.batch_sizes, [point.step_s for point in self.points])

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [point.to_dict() for point in self.points],
            "knee_batch_size": self.knee_batch_size,
            "best_batch_size": self.best_batch_size,
            "best_samples_per_s": self.best_samples_per_s,
            "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason,
            "oom_batch_size": self.oom_batch_size,
        }


@dataclass(frozen=True)
class VariantResult:
    name: str
    settings: dict[str, Any]
    curve: Curve
    base_best_samples_per_s: float

    @property
    def speedup(self) -> float:
        """Best throughput with the variant over the best without it."""
        return self.curve.best_samples_per_s / self.base_best_samples_per_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "settings": {key: _describe_setting(value) for key, value in self.settings.items()},
            **self.curve.to_dict(),
            "speedup_vs_base": self.speedup,
        }


@dataclass(frozen=True)
class ThroughputResult:
    """What `measure_throughput` found. `to_dict()` is the JSON section of a run record."""

    device: str
    unit: str
    curve: Curve
    model: ThroughputModel
    grid: tuple[int, ...]
    max_batch_size: int
    max_batch_size_source: str
    input_pipeline: InputPipelineResult
    variants: tuple[VariantResult, ...]
    seconds: float
    warmup_steps: int
    timed_steps: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def points(self) -> tuple[ThroughputPoint, ...]:
        return self.curve.points

    @property
    def knee_batch_size(self) -> int:
        return self.curve.knee_batch_size

    @property
    def best_batch_size(self) -> int:
        return self.curve.best_batch_size

    @property
    def fraction(self) -> float:
        return self.curve.fraction

    @property
    def stopped_early(self) -> bool:
        return self.curve.stopped_early

    @property
    def stop_reason(self) -> str | None:
        return self.curve.stop_reason

    def samples_per_s_at(self, batch_size: float) -> float:
        """Throughput at any batch size from the fitted model (measured points are exact;
        between them interpolated, beyond them extrapolated conservatively)."""
        return float(self.model.samples_per_s(batch_size))

    @property
    def interpolated_knee_batch_size(self) -> int:
        """The knee on the fitted model rather than on the grid: the smallest batch (a multiple
        of 8 from 8 on, where accelerators tile well) whose modelled throughput is within
        `fraction` of the best measured. Never above the measured knee."""
        knee = self.knee_batch_size
        below = [size for size in self.curve.batch_sizes if size < knee]
        if not below:
            return knee
        step = 8 if below[-1] >= 8 else 1
        target = self.fraction * self.curve.best_samples_per_s
        for size in range((below[-1] // step + 1) * step, knee, step):
            if self.samples_per_s_at(size) >= target:
                return size
        return knee

    def to_dict(self) -> dict[str, Any]:
        curve = self.curve.to_dict()
        return {
            "device": self.device,
            "unit": self.unit,
            **curve,
            "interpolated_knee_batch_size": self.interpolated_knee_batch_size,
            "fraction": self.fraction,
            "model": self.model.to_dict(),
            "grid": list(self.grid),
            "max_batch_size": self.max_batch_size,
            "max_batch_size_source": self.max_batch_size_source,
            "input_pipeline": self.input_pipeline.to_dict(),
            "variants": [variant.to_dict() for variant in self.variants],
            "seconds": self.seconds,
            "warmup_steps": self.warmup_steps,
            "timed_steps": self.timed_steps,
            "notes": list(self.notes),
        }


def _describe_setting(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
