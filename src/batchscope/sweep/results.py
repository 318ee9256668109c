"""A sweep's results: the trials table, the Pareto front, CSV.

The front trades time against quality: a trial is on it when no other trial reached the target
sooner *and* ended at least as good (one of the two strictly). Only trials that ran their full
budget compete (a pruned or diverged trial's "final" metric is not comparable), and when no
target was given, time is the training time of the whole budget. An unranked trial that
reached the target sooner than the front's fastest is named in a note, with why.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from batchscope.record import write_text_atomic
from batchscope.sweep.trial_record import TrialRecord, apply_target

CSV_COLUMNS = (
    "key",
    "batch_size",
    "lr_rule",
    "learning_rate",
    "warmup_steps",
    "outcome",
    "full_budget",
    "final_metric",
    "best_metric",
    "time_to_target",
    "samples_to_target",
    "epochs_to_target",
    "train_seconds",
    "wall_seconds",
    "samples_per_second",
    "steps_done",
    "samples_seen",
    "total_steps",
    "trial_number",
    "on_front",
)


def pareto_front(
    points: Sequence[tuple[float | None, float]], higher_is_better: bool = True
) -> list[int]:
    """Indices of the non-dominated (time, metric) points, ordered by time then by index.

    Time is minimised (None = never reached the target = +inf); the metric is maximised, or
    minimised when `higher_is_better` is False. Identical points are all on the front. Points
    with a non-finite metric never are.
    """
    sign = 1.0 if higher_is_better else -1.0
    cleaned = [
        (math.inf if time is None else float(time), sign * float(metric))
        for time, metric in points
    ]
    front = []
    for i, (time_i, metric_i) in enumerate(cleaned):
        if not math.isfinite(metric_i) or math.isnan(time_i):
            continue
        dominated = any(
            time_j <= time_i
            and metric_j >= metric_i
            and (time_j < time_i or metric_j > metric_i)
            for j, (time_j, metric_j) in enumerate(cleaned)
            if j != i and math.isfinite(metric_j) and not math.isnan(time_j)
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (cleaned[i][0], i))


def front_time(trial: TrialRecord, has_target: bool) -> float | None:
    """The time coordinate of a trial on the front (see the module docstring)."""
    return trial.time_to_target if has_target else trial.train_seconds


@dataclass
class SweepResult:
    """The trials of a sweep (finished ones, one per point), its front and where it was saved."""

    trials: list[TrialRecord]
    front: list[str]
    higher_is_better: bool
    target_metric: float | None
    metric_name: str
    config: dict[str, Any] = field(default_factory=dict)
    predicted_batch_size: int | None = None
    paths: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        trials: Sequence[TrialRecord],
        *,
        higher_is_better: bool,
        target_metric: float | None,
        metric_name: str,
        config: dict[str, Any] | None = None,
        predicted_batch_size: int | None = None,
    ) -> "SweepResult":
        ordered = sorted(trials, key=lambda t: (t.batch_size, t.lr_rule, t.learning_rate))
        for trial in ordered:  # the target may differ from the one the trials ran with
            apply_target(trial, target_metric, higher_is_better)
        candidates = [t for t in ordered if t.full_budget and t.final_metric is not None]
        has_target = target_metric is not None
        indices = pareto_front(
            [(front_time(t, has_target), t.final_metric) for t in candidates],  # type: ignore[misc]
            higher_is_better,
        )
        front = [candidates[i] for i in indices]
        sooner = unranked_sooner(ordered, front[0] if front else None, target_metric)
        return cls(
            trials=ordered,
            front=[t.key for t in front],
            higher_is_better=higher_is_better,
            target_metric=target_metric,
            metric_name=metric_name,
            config=dict(config or {}),
            predicted_batch_size=predicted_batch_size,
            notes=[unranked_note(sooner, front[0] if front else None)] if sooner else [],
        )

    def front_trials(self) -> list[TrialRecord]:
        by_key = {t.key: t for t in self.trials}
        return [by_key[key] for key in self.front]

    def best(self) -> TrialRecord | None:
        """The front's first trial: the soonest to the target (or to the end of its budget)."""
        front = self.front_trials()
        return front[0] if front else None

    def table(self) -> list[dict[str, Any]]:
        """One row per trial with the CSV columns (the report and the CLI print these)."""
        on_front = set(self.front)
        rows = []
        for trial in self.trials:
            row = {name: getattr(trial, name, None) for name in CSV_COLUMNS}
            row["trial_number"] = trial.extra.get("trial_number")
            row["on_front"] = trial.key in on_front
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "target_metric": self.target_metric,
            "front_time": "time_to_target" if self.target_metric is not None else "train_seconds",
            "predicted_batch_size": self.predicted_batch_size,
            "config": self.config,
            "trials": [trial.to_dict() for trial in self.trials],
            "front": self.front,
            "paths": self.paths,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepResult":
        return cls(
            trials=[TrialRecord.from_dict(t) for t in data.get("trials", [])],
            front=list(data.get("front", [])),
            higher_is_better=bool(data.get("higher_is_better", True)),
            target_metric=data.get("target_metric"),
            metric_name=str(data.get("metric", "metric")),
            config=dict(data.get("config", {})),
            predicted_batch_size=data.get("predicted_batch_size"),
            paths=dict(data.get("paths", {})),
            notes=list(data.get("notes", [])),
        )


def unranked_sooner(
    trials: Sequence[TrialRecord], fastest: TrialRecord | None, target: float | None
) -> list[TrialRecord]:
    """Trials off the front for ending before their budget (pruned, diverged, out of memory)
    that reached the target sooner than the front's fastest trial: the ranking must say why
    it calls a slower trial the fastest. (The backends no longer prune a trial at the target,
    but a study resumed with a new target, or a trial that diverged later, still gives these.)"""
    if target is None:
        return []
    best = fastest.time_to_target if fastest is not None else None
    return [
        t for t in trials
        if not t.full_budget and t.time_to_target is not None
        and (best is None or t.time_to_target < best)
    ]


def unranked_note(sooner: Sequence[TrialRecord], fastest: TrialRecord | None) -> str:
    listed = ", ".join(f"{t.key} ({t.outcome}, {t.time_to_target:.3g} s)" for t in sooner)
    if fastest is None:
        than = "but no trial ran its full budget"
    elif fastest.time_to_target is None:
        than = f"while the front's first trial {fastest.key} never did"
    else:
        than = f"sooner than the front's fastest {fastest.key} ({fastest.time_to_target:.3g} s)"
    rerun = (" (a new --study trains pruned ones to the end: a trial at the target is not "
             "pruned)" if any(t.outcome == "pruned" for t in sooner) else "")
    return (f"{listed} reached the target {than}, but ended before their budget, so they are "
            f"not ranked: final metrics compare only at the full budget{rerun}")


@dataclass(frozen=True)
class TrialFailure:
    """A trial that raised: its point's key and the error in one line."""

    key: str
    error: str


class SweepTrialsFailed(RuntimeError):
    """Some trials raised; the others' results were kept and written (`result`, `result.paths`)
    and a rerun of the same sweep runs only the failed points."""

    def __init__(self, result: SweepResult, failures: Sequence[TrialFailure]):
        self.result = result
        self.failures = list(failures)
        listed = "; ".join(f"{f.key}: {f.error}" for f in self.failures)
        where = result.paths.get("record", "the run record")
        super().__init__(
            f"{len(self.failures)} trial(s) failed ({listed}); the {len(result.trials)} "
            f"finished trial(s) are saved in {where}; fix the cause and rerun the same sweep: "
            f"finished trials are kept and only the failed ones run again"
        )


def trials_csv(result: SweepResult) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in result.table():
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def write_trials_csv(path: str | os.PathLike[str], result: SweepResult) -> Path:
    return write_text_atomic(path, trials_csv(result), durable=False)  # rebuilt from the record
