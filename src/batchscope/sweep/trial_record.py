"""What a sweep trial measured, as plain data: settings, evaluation points, the trial record,
and the summary derived from its curve (final/best metric, throughput, time to target).

Plain dataclasses that round-trip through JSON, so records stored in an Optuna study, reported
by a Ray trial or saved in a run record are all the same thing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from batchscope.checks import require_finite_number, require_int

OUTCOMES = ("complete", "pruned", "diverged", "oom")
"""How a trial can end as a result (anything else raised is a bug and propagates)."""
MAX_SEED = 2**32 - 1
"""The largest seed numpy's RNG (which Optuna's samplers use) accepts."""


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of one sweep shares."""

    epochs: int
    evals_per_epoch: int = 2
    seed: int = 0
    target_metric: float | None = None
    rule_warmup_epochs: float | None = None
    max_micro_batch_size: int | None = None
    """Larger batches are trained as accumulated micro-batches of at most this many examples
    (e.g. the memory probe's answer); None trains every batch in one pass."""

    def __post_init__(self) -> None:
        for name in ("epochs", "evals_per_epoch"):
            # Frozen: store the plain int, so a numpy integer serialises like any other.
            object.__setattr__(self, name, require_int(name, getattr(self, name), hint="e.g. 2"))
        # numpy and Optuna's samplers refuse any other seed, which would surface mid-sweep as
        # a traceback after the study's files were created.
        object.__setattr__(self, "seed", require_int(
            "seed", self.seed, minimum=0, maximum=MAX_SEED, hint="--seed, e.g. 0"))
        if self.target_metric is not None:
            # NaN was stored as null and the target silently dropped.
            require_finite_number("target_metric", self.target_metric,
                                  hint="--target-metric, e.g. 0.6 for 60% accuracy")
        if self.max_micro_batch_size is not None:
            object.__setattr__(self, "max_micro_batch_size", require_int(
                "max_micro_batch_size", self.max_micro_batch_size,
                hint="--micro-batch-size: the most examples one forward pass may hold, e.g. "
                     "what `batchscope probe memory` recommends"))

    @property
    def eval_points(self) -> int:
        return self.epochs * self.evals_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalPoint:
    """The metric at one point of the common grid (`index` 1..epochs*evals_per_epoch)."""

    index: int
    epoch: float
    step: int
    samples_seen: int
    train_seconds: float
    metric: float
    train_loss: float | None


@dataclass
class TrialRecord:
    """Everything one trial measured, as plain data (stored in the study and the run record)."""

    key: str
    batch_size: int
    lr_rule: str
    learning_rate: float
    warmup_steps: int
    steps_per_epoch: int
    total_steps: int
    seed: int
    outcome: str = "complete"
    steps_done: int = 0
    samples_seen: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    samples_per_second: float | None = None
    final_metric: float | None = None
    best_metric: float | None = None
    time_to_target: float | None = None
    samples_to_target: int | None = None
    epochs_to_target: float | None = None
    full_budget: bool = False
    message: str | None = None
    curve: list[EvalPoint] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialRecord":
        values = dict(data)
        values["curve"] = [EvalPoint(**point) for point in values.get("curve", [])]
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


def summarise(record: TrialRecord, settings: TrialSettings, higher_is_better: bool) -> None:
    """Fill the summary fields (final/best metric, throughput, full budget, target) from the
    curve and the counters."""
    metrics = [point.metric for point in record.curve if math.isfinite(point.metric)]
    record.final_metric = record.curve[-1].metric if record.curve else None
    if metrics:
        record.best_metric = max(metrics) if higher_is_better else min(metrics)
    if record.train_seconds > 0 and record.samples_seen:
        record.samples_per_second = record.samples_seen / record.train_seconds
    record.full_budget = record.outcome == "complete" and len(record.curve) == settings.eval_points
    apply_target(record, settings.target_metric, higher_is_better)


def apply_target(record: TrialRecord, target: float | None, higher_is_better: bool) -> None:
    """Set time/samples/epochs to `target`: the first evaluation that reached it (None if none
    did). Recomputed from the curve, so a stored trial can be judged against a new target."""
    record.time_to_target = record.samples_to_target = record.epochs_to_target = None
    point = first_reaching(record.curve, target, higher_is_better)
    if point is not None:
        record.time_to_target = point.train_seconds
        record.samples_to_target = point.samples_seen
        record.epochs_to_target = point.epoch


def first_reaching(
    curve: list[EvalPoint], target: float | None, higher_is_better: bool
) -> EvalPoint | None:
    """The first evaluation at or past `target` (None: no target, or none reached it)."""
    if target is None:
        return None
    for point in curve:
        if point.metric >= target if higher_is_better else point.metric <= target:
            return point
    return None
