"""Run sweep trials on Ray Tune: one trial per GPU (or per machine on CPU), ASHA early stopping.

Each Ray trial runs the same `run_trial` as the Optuna backend and reports after every
evaluation of the common samples grid (`eval_index` is ASHA's time attribute), carrying the
trial's record so far; the last report of each trial becomes its TrialRecord. A trial ASHA
stopped before the end of its budget is "pruned" and, like every trial that did not run its
full budget, stays off the Pareto front; so ASHA never stops one that has reached the target
(its time-to-target is what the sweep ranks).

A CPU trial takes all of a machine's CPUs: trials sharing cores slow each other down, and the
sweep measures speed (samples/s, time to target). A GPU trial takes one GPU.

Resume without unpickling: the driver saves each trial's record as plain JSON the moment Ray
reports the trial finished (see trial_store.py); running the same study again skips those
points. A trial that raised is collected as a failure, not raised at once, so the other trials'
results are kept and written; the sweep raises afterwards, naming every failure, and a rerun
runs only the failed points.

Ray is optional (`pip install batchscope[ray]`) and imported only here, only when used.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from batchscope.errors import UsageError
from batchscope.record import to_jsonable
from batchscope.sweep.grid import SEARCH_RULE, GridPoint, SearchSpace
from batchscope.sweep.results import TrialFailure
from batchscope.sweep.trial_record import (
    MAX_SEED,
    EvalPoint,
    TrialRecord,
    TrialSettings,
    first_reaching,
    summarise,
)
from batchscope.sweep.trial_store import TrialStore
from batchscope.workload import Workload

RAY_HINT = "the ray backend needs Ray Tune: pip install 'batchscope[ray]'"
METRIC = "metric"
TIME_ATTR = "eval_index"
REACHED = "reached_target"


@dataclass(frozen=True)
class RaySweepSpec:
    workload: str | Workload
    workload_options: dict[str, Any]
    settings: TrialSettings
    points: list[GridPoint] | None
    space: SearchSpace | None
    n_trials: int | None
    device: torch.device
    pruning: bool
    higher_is_better: bool
    storage_dir: Path
    name: str
    address: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """What must match for a rerun to reuse saved trials (the Optuna study's config)."""

    @property
    def records_dir(self) -> Path:
        return self.storage_dir / "records" / self.name


@dataclass
class RaySweepRun:
    records: list[TrialRecord]
    """Finished trials: saved by an earlier run or by this one."""
    failures: list[TrialFailure]
    """Trials that raised (or ended without a final report) in this run; they run again next time."""
    resources: dict[str, float] | None = None
    """What each trial of this run asked Ray for (None: Ray was not started)."""


@dataclass(frozen=True)
class RemainingWork:
    """What a run of the study still has to train, given the records saved so far."""

    points: list[GridPoint] | None
    """Grid mode: the points without a saved record, in grid order."""
    samples: int
    """How many Ray trials to launch."""
    kept: list[TrialRecord]
    """Saved records this sweep reports."""
    search_seed: int
    history: list[tuple[dict[str, Any], float]]
    """Search mode: (params, final metric) of saved full-budget trials, told to the sampler."""


def remaining_work(spec: RaySweepSpec, saved: list[TrialRecord]) -> RemainingWork:
    if spec.space is None:
        if spec.points is None:
            raise ValueError("a grid sweep needs its points")
        wanted = {p.key for p in spec.points}
        kept = [r for r in saved if r.key in wanted]
        done = {r.key for r in kept}
        points = [p for p in spec.points if p.key not in done]
        return RemainingWork(points, len(points), kept, spec.settings.seed, [])
    kept = [r for r in saved if r.lr_rule == SEARCH_RULE]
    history = [
        ({"batch_size": r.batch_size, "learning_rate": r.learning_rate}, float(r.final_metric))
        for r in kept
        if r.full_budget and r.final_metric is not None and math.isfinite(r.final_metric)
    ]
    return RemainingWork(
        points=None,
        samples=max(0, int(spec.n_trials or 0) - len(kept)),
        kept=kept,
        # The sampler's random start points come from its seed alone: with the first run's
        # seed a resumed search would draw (and train) the points it already has.
        search_seed=(spec.settings.seed + len(kept)) % (MAX_SEED + 1),
        history=history,
    )


def import_ray() -> Any:
    try:
        import ray
        from ray import tune  # noqa: F401 - the tune extra, not just ray core
    except ImportError:
        raise UsageError(RAY_HINT) from None
    return ray


def run_ray_sweep(spec: RaySweepSpec, progress: Callable[[str], None] | None = None) -> RaySweepRun:
    """Run every grid point (or `n_trials` searched points) not finished by an earlier run as
    Ray Tune trials; trial errors are returned as failures, not raised."""
    store = TrialStore(spec.records_dir, spec.name)
    store.check_config(spec.config)
    work = remaining_work(spec, store.load())
    if work.samples == 0:
        return RaySweepRun(work.kept, [])  # nothing left: not even Ray is started
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=spec.address, include_dashboard=False, log_to_driver=False)
    try:
        resources = trial_resources(spec.device, node_cpu_counts(ray.nodes()))
        results = _fit(spec, work, store, resources)
    finally:
        if started_here:
            ray.shutdown()
    saved = {r.key: r for r in store.load()}
    records = {r.key: r for r in work.kept}
    failures = []
    for result in results:
        key = _result_key(result.config or {})
        if result.error is not None:
            failures.append(TrialFailure(key, describe_error(result.error)))
        elif key not in saved:
            failures.append(
                TrialFailure(key, "ended without a final report (it trained zero evaluations)")
            )
        else:
            record = records[key] = saved[key]
            if progress is not None:
                progress(f"[{record.key}] {record.outcome}: final metric {record.final_metric}")
    return RaySweepRun(list(records.values()), failures, resources)


def node_cpu_counts(nodes: list[dict[str, Any]]) -> list[float]:
    """The CPUs of each live node with any (`ray.nodes()` entries; a head started with
    --num-cpus=0 runs no trial)."""
    counts = [float(node.get("Resources", {}).get("CPU", 0)) for node in nodes if node.get("Alive")]
    return [count for count in counts if count > 0]


def trial_resources(device: torch.device, node_cpus: list[float]) -> dict[str, float]:
    """What one trial asks Ray for. On CPU: every core of the smallest node, so a node runs
    one trial at a time (trials sharing cores would time each other's contention, not their
    batch size; Ray also sets the trial's thread count to its CPUs) and every node can run
    one. On a GPU: one GPU and one CPU to feed it, so a node runs one trial per GPU."""
    if device.type == "cuda":
        return {"gpu": 1, "cpu": 1}
    return {"cpu": min(node_cpus) if node_cpus else 1}


def _fit(
    spec: RaySweepSpec, work: RemainingWork, store: TrialStore, resources: dict[str, float]
) -> Any:
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    use_gpu = spec.device.type == "cuda"
    payload = {
        "workload": spec.workload,
        "workload_options": spec.workload_options,
        "settings": spec.settings.to_dict(),
        "device": "cuda" if use_gpu else str(spec.device),
        "higher_is_better": spec.higher_is_better,
    }
    trainable = tune.with_resources(tune.with_parameters(_ray_trial, payload=payload), resources)
    scheduler = (
        target_keeping_asha(**scheduler_settings(spec.settings))
        if spec.pruning
        else FIFOScheduler()
    )
    param_space, search_alg = _search_setup(spec, work, tune)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max" if spec.higher_is_better else "min", scheduler=scheduler,
            search_alg=search_alg, num_samples=1 if work.points is not None else work.samples,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(spec.storage_dir.resolve()),
            verbose=0,
            callbacks=[_record_saver(store, spec.settings, spec.higher_is_better)],
        ),
    )
    # Tune prints its configuration box and status tables on stdout, which belongs to the
    # command's own output (--json): send them to stderr with the other logs.
    with contextlib.redirect_stdout(sys.stderr):
        return tuner.fit()


def _record_saver(store: TrialStore, settings: TrialSettings, higher_is_better: bool) -> Any:
    """A Tune callback that saves each trial's record when it finishes (complete, diverged,
    out of memory, or stopped by ASHA), so a driver killed mid-sweep loses no finished trial."""
    from ray.tune import Callback

    class SaveFinishedTrials(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            metrics = trial.last_result or {}
            if "record" in metrics:  # one without is reported as a failure after the fit
                store.save(merge_result(metrics, settings, higher_is_better))

    return SaveFinishedTrials()


def describe_error(error: BaseException) -> str:
    """One line for a trial's error: Ray wraps the trial's exception and appends a traceback,
    so name the innermost exception (type and message) instead."""
    inner = error
    for candidate in (getattr(error, "cause", None), error.__cause__):
        if isinstance(candidate, BaseException):
            inner = candidate
            break
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[-1].strip() if text else ''}".rstrip(": ")


def _result_key(config: dict[str, Any]) -> str:
    if "point" in config:
        return GridPoint.from_dict(config["point"]).key
    if "batch_size" in config and "learning_rate" in config:
        return GridPoint(int(config["batch_size"]), SEARCH_RULE, float(config["learning_rate"])).key
    return "unknown trial"


def scheduler_description(spec: RaySweepSpec) -> dict[str, Any]:
    """What early stopping this sweep uses, for the run record."""
    if not spec.pruning:
        return {"name": "FIFO (no early stopping)"}
    return {"name": "ASHA", "time_attr": TIME_ATTR, "metric": METRIC,
            **scheduler_settings(spec.settings)}


def scheduler_settings(settings: TrialSettings) -> dict[str, int]:
    """ASHA's rungs on the samples grid: first decision after one epoch, budget = all points."""
    return {
        "max_t": settings.eval_points,
        "grace_period": min(settings.evals_per_epoch, settings.eval_points),
        "reduction_factor": 3,
    }


def target_keeping_asha(**settings: Any) -> Any:
    """ASHA on the samples grid that lets a trial which reported reaching the target go on:
    its time-to-target is measured, and only a trial that finishes its budget is ranked."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class TargetKeepingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            # Always recorded at its rung, so the other trials' cutoffs still count it.
            action = super().on_trial_result(tune_controller, trial, result)
            return TrialScheduler.CONTINUE if result.get(REACHED) else action

    return TargetKeepingASHA(time_attr=TIME_ATTR, **settings)


def _search_setup(spec: RaySweepSpec, work: RemainingWork, tune: Any) -> tuple[dict[str, Any], Any]:
    if work.points is not None:
        return {"point": tune.grid_search([p.to_dict() for p in work.points])}, None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if spec.space is None:
        raise ValueError("a search sweep needs its space")
    space = spec.space
    param_space = {
        "batch_size": tune.lograndint(space.min_batch_size, space.max_batch_size + 1),
        "learning_rate": tune.loguniform(space.min_lr, space.max_lr),
    }
    searcher = OptunaSearch(
        sampler=optuna.samplers.TPESampler(seed=work.search_seed),
        # Finished trials of earlier runs inform the sampler without being trained again.
        points_to_evaluate=[params for params, _ in work.history] or None,
        evaluated_rewards=[reward for _, reward in work.history] or None,
    )
    return param_space, searcher


def _ray_trial(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """The Ray Tune function trainable: one trial, reporting after each evaluation."""
    from ray import tune

    from batchscope.sweep.trial import run_trial
    from batchscope.workload import resolve_workload

    workload = resolve_workload(payload["workload"], **payload["workload_options"])
    settings = TrialSettings(**payload["settings"])
    if "point" in config:
        point = GridPoint.from_dict(config["point"])
    else:
        point = GridPoint(int(config["batch_size"]), SEARCH_RULE, float(config["learning_rate"]))

    def on_eval(evaluation: EvalPoint, record: TrialRecord) -> bool:
        reached = first_reaching(record.curve, settings.target_metric, payload["higher_is_better"])
        tune.report(_report(evaluation.index, evaluation.metric, record, reached is not None))
        return False  # ASHA stops the trial from outside

    record = run_trial(workload, point, settings, torch.device(payload["device"]), on_eval)
    if record.outcome != "complete":  # diverged or OOM: say so, or the last report says "running"
        worst = -math.inf if payload["higher_is_better"] else math.inf
        last = record.curve[-1] if record.curve else None
        tune.report(_report(last.index if last else 0, last.metric if last else worst, record))


def _report(index: int, metric: float, record: TrialRecord, reached: bool = False) -> dict[str, Any]:
    return {
        TIME_ATTR: index,
        METRIC: metric,
        REACHED: reached,
        "outcome": record.outcome,
        "record": json.dumps(to_jsonable(record.to_dict())),
    }


def merge_result(metrics: dict[str, Any], settings: TrialSettings, higher_is_better: bool) -> TrialRecord:
    """A Ray result's last report -> the trial's TrialRecord, in the Optuna backend's format."""
    if "record" not in metrics:
        raise UsageError("a Ray trial ended without reporting (it trained zero evaluations)")
    record = TrialRecord.from_dict(json.loads(metrics["record"]))
    if record.outcome == "complete" and len(record.curve) < settings.eval_points:
        record.outcome = "pruned"  # ASHA stopped it between reports
    record.wall_seconds = float(metrics.get("time_total_s", record.wall_seconds) or 0.0)
    record.extra.update(backend="ray", trial_id=metrics.get("trial_id"))
    summarise(record, settings, higher_is_better)
    return record
