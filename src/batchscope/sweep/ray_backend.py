"""Run sweep trials on Ray Tune: one trial per GPU (or per CPU), ASHA early stopping.

Each Ray trial runs the same `run_trial` as the Optuna backend and reports after every
evaluation of the common samples grid (`eval_index` is ASHA's time attribute), carrying the
trial's record so far; the last report of each trial becomes its TrialRecord. A trial ASHA
stopped before the end of its budget is "pruned" and, like every trial that did not run its
full budget, stays off the Pareto front.

Ray is optional (`pip install batchscope[ray]`) and imported only here, only when used.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from batchscope.errors import UsageError
from batchscope.record import to_jsonable
from batchscope.sweep.grid import SEARCH_RULE, GridPoint, SearchSpace
from batchscope.sweep.trial_record import EvalPoint, TrialRecord, TrialSettings, summarise
from batchscope.workload import Workload

RAY_HINT = "the ray backend needs Ray Tune: pip install 'batchscope[ray]'"
METRIC = "metric"
TIME_ATTR = "eval_index"


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


def import_ray() -> Any:
    try:
        import ray
        from ray import tune  # noqa: F401 - the tune extra, not just ray core
    except ImportError:
        raise UsageError(RAY_HINT) from None
    return ray


def run_ray_sweep(spec: RaySweepSpec, progress: Callable[[str], None] | None = None) -> list[TrialRecord]:
    """Run every grid point (or `n_trials` searched points) as Ray Tune trials."""
    ray = import_ray()
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=spec.address, include_dashboard=False, log_to_driver=False)
    try:
        use_gpu = spec.device.type == "cuda"
        payload = {
            "workload": spec.workload,
            "workload_options": spec.workload_options,
            "settings": spec.settings.to_dict(),
            "device": "cuda" if use_gpu else str(spec.device),
            "higher_is_better": spec.higher_is_better,
        }
        trainable = tune.with_resources(
            tune.with_parameters(_ray_trial, payload=payload),
            {"gpu": 1, "cpu": 1} if use_gpu else {"cpu": 1},
        )
        mode = "max" if spec.higher_is_better else "min"
        scheduler = (
            ASHAScheduler(time_attr=TIME_ATTR, **scheduler_settings(spec.settings))
            if spec.pruning
            else FIFOScheduler()
        )
        param_space, search_alg, samples = _search_setup(spec, tune)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=mode, scheduler=scheduler, search_alg=search_alg,
                num_samples=samples,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=str(spec.storage_dir.resolve()),
                verbose=0,
            ),
        )
        # Tune prints its configuration box and status tables on stdout, which belongs to the
        # command's own output (--json): send them to stderr with the other logs.
        with contextlib.redirect_stdout(sys.stderr):
            results = tuner.fit()
        records = []
        for result in results:
            if result.error is not None:
                raise result.error
            records.append(merge_result(result.metrics or {}, spec.settings, spec.higher_is_better))
            if progress is not None:
                record = records[-1]
                progress(f"[{record.key}] {record.outcome}: final metric {record.final_metric}")
        return records
    finally:
        if started_here:
            ray.shutdown()


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


def _search_setup(spec: RaySweepSpec, tune: Any) -> tuple[dict[str, Any], Any, int]:
    if spec.space is None:
        assert spec.points is not None  # set by sweep() for grid mode
        return {"point": tune.grid_search([p.to_dict() for p in spec.points])}, None, 1
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    space = spec.space
    param_space = {
        "batch_size": tune.lograndint(space.min_batch_size, space.max_batch_size + 1),
        "learning_rate": tune.loguniform(space.min_lr, space.max_lr),
    }
    searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.settings.seed))
    return param_space, searcher, int(spec.n_trials or 1)


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
        tune.report(_report(evaluation.index, evaluation.metric, record))
        return False  # ASHA stops the trial from outside

    record = run_trial(workload, point, settings, torch.device(payload["device"]), on_eval)
    if record.outcome != "complete":  # diverged or OOM: say so, or the last report says "running"
        worst = -math.inf if payload["higher_is_better"] else math.inf
        last = record.curve[-1] if record.curve else None
        tune.report(_report(last.index if last else 0, last.metric if last else worst, record))


def _report(index: int, metric: float, record: TrialRecord) -> dict[str, Any]:
    return {
        TIME_ATTR: index,
        METRIC: metric,
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
