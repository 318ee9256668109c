"""`batchscope.sweep(...)`: short real training runs over batch sizes, and what they show.

Each trial trains the workload from scratch for the same number of epochs at one batch size,
with the LR (and warmup) scaled by a rule, evaluated on a common samples-seen grid. The result
is the picture `tune`'s prediction should agree with: quality and time-to-target per batch
size, and the Pareto front of time vs quality.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from batchscope import device as devices
from batchscope.atomic import check_writable_directory
from batchscope.checks import require_int
from batchscope.errors import UsageError
from batchscope.record import environment_info
from batchscope.sweep.grid import (
    MODES,
    GridPoint,
    SearchSpace,
    expand_lr_rules,
    grid_points,
    merged_reference_points,
    reference_rule,
    validate_batch_sizes,
)
from batchscope.sweep.output import resolve_predicted, write_outputs
from batchscope.sweep.results import SweepResult, SweepTrialsFailed, TrialFailure
from batchscope.sweep.trial import run_trial
from batchscope.sweep.trial_record import EvalPoint, TrialRecord, TrialSettings, first_reaching
from batchscope.workload import Workload, resolve_workload

BACKENDS = ("optuna", "ray")
DEFAULT_OUT_DIR = "batchscope-sweep"
"""Where a sweep writes when no `out_dir` is given: this folder in the current directory."""
Progress = Callable[[str], None]


@dataclass(frozen=True)
class SweepPlan:
    """Everything a backend needs to run one sweep, validated and resolved by `sweep()`."""

    workload: Workload
    source: str | Workload
    """What the caller passed: a name or entry point is resolved again in each Ray worker."""
    workload_options: dict[str, Any]
    settings: TrialSettings
    points: list[GridPoint] | None
    """Grid mode: every point; None in search mode."""
    space: SearchSpace | None
    """Search mode: the ranges; None in grid mode."""
    n_trials: int | None
    device: torch.device
    out_dir: Path
    study_name: str
    storage: str | None
    pruning: bool
    config: dict[str, Any]
    """What must match for a resumed study's trials to be comparable."""
    progress: Progress | None
    heartbeat_interval: float
    ray_address: str | None


@dataclass
class BackendRun:
    records: list[TrialRecord]
    early_stopping: dict[str, Any]
    failures: list[TrialFailure]
    notes: list[str] = field(default_factory=list)
    """What the backend chose that a reader of the results should know."""


def sweep(
    workload: str | Workload,
    batch_sizes: Sequence[int],
    lr_rule: str | Sequence[str] = "linear",
    epochs: int = 1,
    target_metric: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    backend: str = "optuna",
    device: str | torch.device | None = None,
    out_dir: str | os.PathLike[str] = DEFAULT_OUT_DIR,
    pruning: bool = True,
    mode: str = "grid",
    n_trials: int | None = None,
    predicted_batch_size: int | str | os.PathLike[str] | None = None,
    *,
    workload_options: dict[str, Any] | None = None,
    evals_per_epoch: int = 2,
    seed: int = 0,
    warmup_epochs: float | None = None,
    max_micro_batch_size: int | None = None,
    progress: Progress | None = None,
    ray_address: str | None = None,
    heartbeat_interval: float = 10.0,
    report: bool = True,
) -> SweepResult:
    """Train one short trial per grid point (or `n_trials` searched points) and compare them.

    Args:
        workload: a built-in name, a `package.module:function` entry point, or a Workload
            (it needs `epoch_batches`, `evaluate` and `dataset_size`).
        batch_sizes: the grid (grid mode) or the range's ends (search mode).
        lr_rule: "linear", "sqrt", "none" or "all" (every rule is a grid axis).
        epochs: training epochs per trial (every trial sees the same samples).
        target_metric: the quality to reach; time-to-target is measured against it.
        storage: Optuna storage (backend "optuna" only): None = a journal file in `out_dir`
            (resumable), a journal file path, or an RDB URL (e.g. postgresql://...) that
            workers on many machines share.
        study_name: the study to create or resume (default `<workload>-<mode>`).
        backend: "optuna" (this process runs trials) or "ray" (Ray Tune, one trial per GPU,
            or on CPU one per machine, so trials do not share cores).
            A Ray trial that raises does not stop the others: their results are written, then
            `SweepTrialsFailed` names the failures, and rerunning the sweep runs only those.
        out_dir: where the record, CSV, report and resume state go; default
            `batchscope-sweep` in the current directory. Rerunning with the same `out_dir`
            and `study_name` resumes the sweep.
        pruning: stop hopeless trials early (successive halving / ASHA on the samples grid);
            a trial that has reached `target_metric` is never stopped.
        mode: "grid" (batch sizes x rules) or "search" (TPE over batch size and LR ranges).
        n_trials: trials to finish in search mode.
        predicted_batch_size: the batch `tune` recommended (an int, or a tune run.json path);
            marked on the plots.
        evals_per_epoch: evaluation points per epoch (the samples grid; pruning steps).
        warmup_epochs: the LR rule's warmup length (default: 5 epochs, at most 20% of a trial).
        max_micro_batch_size: train larger batches as accumulated micro-batches of at most
            this many examples (e.g. `probe_memory`'s recommendation), so the grid may go past
            what fits in one pass.
        progress: called with a one-line message after each evaluation.
        report: also draw the figures and the HTML report (the record and CSV are always
            written; workers of a shared sweep can leave the report to one of them).
    """
    n_trials = _check_backend_and_mode(backend, mode, n_trials, storage)
    rules = expand_lr_rules(lr_rule)
    settings = TrialSettings(epochs, evals_per_epoch, seed, target_metric, warmup_epochs,
                             max_micro_batch_size)
    resolved = resolve_workload(workload, **(workload_options or {}))
    if resolved.evaluate is None or resolved.epoch_batches is None or resolved.dataset_size is None:
        raise UsageError(
            f"workload {resolved.name!r} lacks evaluate/epoch_batches/dataset_size, which a sweep "
            f"needs to train and score real epochs"
        )
    sizes = validate_batch_sizes(batch_sizes, resolved.dataset_size)
    predicted = resolve_predicted(predicted_batch_size)
    # Last of the checks, as it creates the directory: a bad argument leaves nothing behind.
    check_output_paths(out_dir, storage if backend == "optuna" else None)
    space = (
        SearchSpace.around(sizes, resolved.reference_batch_size, resolved.reference_lr)
        if mode == "search"
        else None
    )
    plan = SweepPlan(
        workload=resolved,
        source=workload,
        workload_options=dict(workload_options or {}),
        settings=settings,
        points=grid_points(sizes, rules, resolved.reference_batch_size)
        if space is None else None,
        space=space,
        n_trials=n_trials,
        device=devices.resolve_device(device),
        out_dir=Path(out_dir),
        study_name=study_name or f"{resolved.name}-{mode}",
        storage=storage,
        pruning=pruning,
        config=_study_config(resolved, settings, mode, space),
        progress=progress,
        heartbeat_interval=heartbeat_interval,
        ray_address=ray_address,
    )
    run = _run_optuna(plan) if backend == "optuna" else _run_ray(plan)
    result = SweepResult.build(
        run.records,
        higher_is_better=resolved.higher_is_better,
        target_metric=target_metric,
        metric_name=resolved.metric_name,
        config={**plan.config, "backend": backend, "study": plan.study_name, "lr_rules": rules,
                "batch_sizes": sizes, "pruning": pruning, "early_stopping": run.early_stopping,
                "n_trials": n_trials, "storage": _storage_label(plan, backend)},
        predicted_batch_size=predicted,
    )
    merged = merged_reference_points(sizes, rules, resolved.reference_batch_size)
    if space is None and merged:
        kept = GridPoint(resolved.reference_batch_size, reference_rule(rules)).key
        result.notes.append(
            f"At the reference batch {resolved.reference_batch_size} every LR rule gives the "
            f"reference LR, so {kept} also stands for {', '.join(merged)} (trained once)."
        )
    result.notes.extend(run.notes)
    failed = {failure.key for failure in run.failures}
    for failure in run.failures:
        result.notes.append(
            f"Trial {failure.key} failed ({failure.error}); rerunning the sweep runs it again."
        )
    if plan.points is not None:
        finished = {t.key for t in result.trials}
        missing = sorted({p.key for p in plan.points} - finished - failed)
        if missing:
            result.notes.append(
                f"{len(missing)} grid point(s) not finished by this worker (still running on "
                f"another worker, or interrupted): {', '.join(missing)}"
            )
    write_outputs(
        result, plan.out_dir, workload=resolved.describe(),
        environment=environment_info(plan.device), report=report,
    )
    if run.failures:
        raise SweepTrialsFailed(result, run.failures)
    return result


def _check_backend_and_mode(
    backend: str, mode: str, n_trials: int | None, storage: str | None
) -> int | None:
    """Refuse options that do not fit together; returns `n_trials` as an int in search mode."""
    if backend not in BACKENDS:
        raise UsageError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "ray" and storage is not None:
        from batchscope.sweep.optuna_backend import redact_url

        raise UsageError(
            f"storage={redact_url(storage)!r} is for --backend optuna only; the ray backend keeps "
            f"its trials in --out (<out>/ray), so drop --storage or use --backend optuna"
        )
    if mode not in MODES:
        raise UsageError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    if mode == "search":
        return require_int("n_trials", n_trials, hint="search mode needs --n-trials, e.g. 20")
    if n_trials is not None:
        raise UsageError("n_trials applies to --mode search only; a grid runs every point once")
    return None


def check_output_paths(out_dir: str | os.PathLike[str], journal: str | None = None) -> None:
    """Create `out_dir` (and a journal file's folder) and prove they are writable, before any
    trial trains: a sweep that ends in an unwritable path has thrown its minutes away.
    `journal` is an Optuna --storage value; a database URL is the database's business."""
    out = Path(out_dir)
    checks = [(out, "--out", out, "pass --out a writable directory (new or existing)")]
    if journal is not None and "://" not in journal:
        if Path(journal).is_dir():
            raise UsageError(f"--storage {journal!r} is a directory; pass a journal file path, "
                             f"e.g. {str(Path(journal) / 'optuna-journal.log')!r}, or a "
                             f"database URL")
        checks.append((Path(journal).parent, "--storage", Path(journal),
                       "pass --storage a journal file in a writable directory, or a database URL"))
    for directory, option, given, fix in checks:  # all, before any folder is created
        blocker = _file_in_the_way(directory)
        if blocker is not None and blocker == given:
            raise UsageError(f"{option} {str(given)!r} is a file, not a directory; {fix}")
        if blocker is not None:
            raise UsageError(f"{option} {str(given)!r} cannot be created: {str(blocker)!r} is "
                             f"a file; {fix}")
    for directory, option, given, fix in checks:
        try:
            check_writable_directory(directory)
        except OSError as exc:
            raise UsageError(f"{option} {str(given)!r} is not writable "
                             f"({exc.strerror or exc}); {fix}") from None


def _file_in_the_way(directory: Path) -> Path | None:
    """The nearest existing path at or above `directory` when it is not a folder (mkdir's
    NotADirectoryError/FileExistsError would say only "Not a directory")."""
    for path in (directory, *directory.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def trial_runner(
    workload: Workload,
    settings: TrialSettings,
    device: torch.device,
    progress: Progress | None,
) -> Callable[..., TrialRecord]:
    """(point, on_eval) -> record, with a progress line after each evaluation (run_trial itself
    leaves the workload's model and the process's RNG states as they were).

    A trial that has reached the target metric is never pruned: pruning stops trials that are
    behind at a rung, but one already at the target has its time-to-target, the number the
    sweep ranks on, and must finish its budget to be ranked (a pruned trial is not)."""

    def run(point: Any, on_eval: Callable[[EvalPoint, TrialRecord], bool]) -> TrialRecord:
        def hook(evaluation: EvalPoint, record: TrialRecord) -> bool:
            if progress is not None:
                progress(
                    f"[{record.key}] epoch {evaluation.epoch:g}: {workload.metric_name} "
                    f"{evaluation.metric:.4f} after {evaluation.samples_seen} samples, "
                    f"{evaluation.train_seconds:.1f}s"
                )
            prune = on_eval(evaluation, record)  # always called: it reports to the pruner
            reached = first_reaching(record.curve, settings.target_metric,
                                     workload.higher_is_better)
            return prune and reached is None

        record = run_trial(workload, point, settings, device, hook)
        if progress is not None:
            progress(f"[{record.key}] {record.outcome}: final {workload.metric_name} {record.final_metric}")
        return record

    return run


def _run_optuna(plan: SweepPlan) -> BackendRun:
    from batchscope.sweep.optuna_backend import (
        OptunaOptions,
        OptunaSweep,
        close_storage,
        open_storage,
        open_study,
    )

    settings = plan.settings
    shared = plan.storage is not None and "://" in plan.storage
    options = OptunaOptions(
        study_name=plan.study_name,
        storage=plan.storage,
        pruning=plan.pruning,
        # The first pruning decision after one epoch (or half of a one-epoch trial): earlier,
        # every curve is still mostly warmup and noise.
        min_resource=settings.evals_per_epoch if settings.epochs > 1 else 1,
        heartbeat_interval=plan.heartbeat_interval,
        grace_seconds=max(60.0, 6 * plan.heartbeat_interval),
        # Workers sharing a database would draw the same "random" start points from one seed.
        sampler_seed=None if shared else settings.seed,
    )
    early_stopping: dict[str, Any] = (
        {"name": "SuccessiveHalving", "step": "evaluation index",
         "min_resource": options.min_resource, "reduction_factor": 3}
        if plan.pruning else {"name": "none"}
    )
    opened = open_storage(plan.storage, plan.out_dir)
    try:
        study = open_study(
            opened, options, higher_is_better=plan.workload.higher_is_better, config=plan.config,
            search=plan.space is not None,
        )
        worker = OptunaSweep(study, opened, options)
        runner = trial_runner(plan.workload, settings, plan.device, plan.progress)
        if plan.space is not None:
            worker.run_search(plan.space, int(plan.n_trials or 0), runner)
            records = worker.records()
        else:
            points = plan.points or []
            worker.run_grid(points, runner)
            records = worker.records({p.key for p in points})
    finally:
        close_storage(opened)
    return BackendRun(records, early_stopping, [])


def _run_ray(plan: SweepPlan) -> BackendRun:
    from batchscope.sweep.ray_backend import RaySweepSpec, run_ray_sweep, scheduler_description

    spec = RaySweepSpec(
        # A name or entry point is resolved again inside each Ray worker (its own data cache);
        # a Workload object travels pickled.
        workload=plan.source if isinstance(plan.source, str) else plan.workload,
        workload_options=plan.workload_options,
        settings=plan.settings,
        points=plan.points,
        space=plan.space,
        n_trials=plan.n_trials,
        device=plan.device,
        pruning=plan.pruning,
        higher_is_better=plan.workload.higher_is_better,
        storage_dir=plan.out_dir / "ray",
        name=plan.study_name,
        address=plan.ray_address,
        config=plan.config,
    )
    run = run_ray_sweep(spec, plan.progress)
    return BackendRun(run.records, scheduler_description(spec), run.failures,
                      [] if run.resources is None else [resources_note(run.resources)])


def resources_note(resources: dict[str, float]) -> str:
    """Why Ray ran the trials as many at a time as it did (see `trial_resources`)."""
    if "gpu" in resources:
        return "Ray ran one trial per GPU at a time (1 GPU and 1 CPU each)."
    cpus = resources["cpu"]
    return (f"Ray gave each trial {cpus:g} CPU{'' if cpus == 1 else 's'}, all the cores of the "
            f"smallest machine, so that machine runs one trial at a time (a larger one as many "
            f"as its cores hold): trials sharing cores would slow each other and skew samples/s "
            f"and time to target.")


def _study_config(
    workload: Workload, settings: TrialSettings, mode: str, space: SearchSpace | None
) -> dict[str, Any]:
    """What must match for trials to be comparable (a resumed study is checked against it)."""
    return {
        "workload": workload.name,
        "dataset_size": workload.dataset_size,
        "reference_batch_size": workload.reference_batch_size,
        "reference_lr": workload.reference_lr,
        "schedule": workload.schedule,
        "epochs": settings.epochs,
        "evals_per_epoch": settings.evals_per_epoch,
        "seed": settings.seed,
        "warmup_epochs": settings.rule_warmup_epochs,
        # Accumulation changes what BatchNorm sees, so a resumed study must keep it.
        "max_micro_batch_size": settings.max_micro_batch_size,
        "mode": mode,
        "search_space": space.to_dict() if space is not None else None,
    }


def _storage_label(plan: SweepPlan, backend: str) -> str:
    if backend == "ray":
        return str(plan.out_dir / "ray")
    from batchscope.sweep.optuna_backend import JOURNAL_NAME, redact_url

    if plan.storage is None:
        return str(plan.out_dir / JOURNAL_NAME)
    return redact_url(plan.storage)
