"""Run sweep trials through an Optuna study: embedded (journal file) or shared (RDB URL).

The study is the source of truth, so any number of `sweep` processes on any machines that
point at the same storage and study name cooperate, and a killed one is resumed by running it
again. Grid points are queued with `enqueue_trial` and claimed one at a time (see
bookkeeping.py for how a point is run exactly once); search mode asks the TPE sampler for new
points until `n_trials` have finished.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from batchscope.errors import UsageError
from batchscope.record import to_jsonable
from batchscope.sweep import bookkeeping as books
from batchscope.sweep.grid import SEARCH_RULE, GridPoint, SearchSpace
from batchscope.sweep.trial_record import EvalPoint, TrialRecord
from batchscope.sweep.trial_store import refuse_changed_settings

JOURNAL_NAME = "optuna-journal.log"
CONFIG_ATTR = "batchscope.config"

TrialRunner = Callable[[GridPoint, Callable[[EvalPoint, TrialRecord], bool]], TrialRecord]
"""(point, on_eval) -> record: trains one trial (the backend supplies the pruning hook)."""


@dataclass(frozen=True)
class OptunaOptions:
    study_name: str
    storage: str | None = None
    pruning: bool = True
    min_resource: int = 1
    heartbeat_interval: float = 10.0
    grace_seconds: float = 60.0
    sampler_seed: int | None = 0


def open_storage(storage: str | None, out_dir: Path) -> BaseStorage:
    """None -> a journal file in `out_dir`; a URL (`postgresql://`, `sqlite:///`, ...) -> RDB;
    anything else -> a journal file at that path."""
    if storage is None or "://" not in storage:
        path = Path(storage) if storage is not None else out_dir / JOURNAL_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    storage = with_installed_driver(storage)
    last_error: Exception | None = None
    # Workers that start together race to create the schema on an empty database; the loser's
    # CREATE TABLE fails once, and a retry finds the tables made.
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})
        except ImportError as exc:
            raise UsageError(
                f"storage {redact_url(storage)} needs a database driver: {exc}; for PostgreSQL "
                f"run `pip install batchscope[postgres]`"
            ) from None
        except Exception as exc:  # noqa: BLE001 - sqlalchemy raises many kinds; retried, then shown
            last_error = exc
            time.sleep(0.5 + random.random() * (attempt + 1))
    raise UsageError(f"cannot open storage {redact_url(storage)}: {last_error}") from last_error


def close_storage(storage: BaseStorage) -> None:
    """Close the database connections an RDB storage pools. Its SQLAlchemy engine keeps them
    open until disposed, which garbage collection does not do: a long-lived process running
    sweep after sweep would hold a pool of idle server connections for each."""
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.remove_session()
        storage.engine.dispose()


def open_study(
    storage: BaseStorage,
    options: OptunaOptions,
    *,
    higher_is_better: bool,
    config: dict[str, Any],
    search: bool,
) -> optuna.Study:
    """Create the study or load it; a loaded study must have been made with the same settings."""
    if search:
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(seed=options.sampler_seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=options.sampler_seed)  # grid: never asked
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.SuccessiveHalvingPruner(min_resource=options.min_resource, reduction_factor=3)
        if options.pruning
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        storage=storage,
        study_name=options.study_name,
        direction="maximize" if higher_is_better else "minimize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    expected = to_jsonable(config)
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None:
        study.set_user_attr(CONFIG_ATTR, expected)
    else:
        refuse_changed_settings(options.study_name, stored, expected)
    return study


class OptunaSweep:
    """One worker of a sweep: reconciles the study, then claims and runs points until none is
    left for it."""

    def __init__(self, study: optuna.Study, storage: BaseStorage, options: OptunaOptions):
        self.study = study
        self.storage = storage
        self.options = options
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.owner = books.Owner.current()
        self.liveness = books.Liveness(self.owner, options.grace_seconds)

    # -- queue maintenance --------------------------------------------------------------------

    def trials(self) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self.study_id, deepcopy=False)

    def reconcile(self, wanted: Sequence[GridPoint] | None) -> int:
        """Fail stale trials, then queue every point that is neither finished nor pending:
        `wanted` grid points, or (search mode) points whose only trials failed to run.
        Returns how many points were queued."""
        for trial in self.trials():
            if self.liveness.is_stale(trial):
                self._retire_stale(trial)
        trials = self.trials()
        status = books.point_status(trials, self.liveness)
        if wanted is not None:
            missing = [p for p in wanted if p.key not in status]
        else:
            missing = []
            for trial in trials:
                key, raw = books.trial_key(trial), trial.user_attrs.get(books.POINT)
                if key and raw and key not in status and key not in {p.key for p in missing}:
                    missing.append(GridPoint.from_dict(raw))
        for point in missing:
            self._enqueue(point)
        return len(missing)

    def _enqueue(self, point: GridPoint) -> None:
        params: dict[str, Any] = {}
        if point.learning_rate is not None:
            params = {"batch_size": point.batch_size, "learning_rate": point.learning_rate}
        self.study.enqueue_trial(
            params, user_attrs={books.KEY: point.key, books.POINT: point.to_dict()}
        )

    def _retire_stale(self, trial: FrozenTrial) -> None:
        """A trial whose worker died: keep its result if it had finished one, else fail it."""
        outcome, raw = books.outcome_of(trial), trial.user_attrs.get(books.RECORD)
        try:
            if outcome in books.FINISHED_OUTCOMES and raw is not None:
                self._tell(trial.number, TrialRecord.from_dict(raw))
            else:
                self.storage.set_trial_system_attr(trial._trial_id, books.OUTCOME, "stale")
                self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker retired it first

    def pop(self) -> FrozenTrial | None:
        """Claim the oldest queued trial (WAITING -> RUNNING is atomic in every storage)."""
        for trial in self.storage.get_all_trials(
            self.study_id, deepcopy=False, states=(TrialState.WAITING,)
        ):
            try:
                if self.storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING):
                    return self.storage.get_trial(trial._trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    def pending_elsewhere(self, keys: set[str] | None = None) -> int:
        return sum(
            1
            for t in self.trials()
            if t.state == TrialState.RUNNING
            and not self.liveness.is_stale(t)
            and (keys is None or books.trial_key(t) in keys)
        )

    def finished_count(self) -> int:
        return sum(1 for t in self.trials() if books.is_finished(t))

    # -- running ------------------------------------------------------------------------------

    def run_grid(self, points: Sequence[GridPoint], runner: TrialRunner) -> None:
        self.reconcile(points)
        while True:
            trial = self.pop()
            if trial is None:
                if self.reconcile(points) == 0:
                    return  # every point is finished or running on another live worker
                continue
            point = GridPoint.from_dict(trial.user_attrs[books.POINT])
            self._run_claimed(trial, point, runner)

    def run_search(self, space: SearchSpace, n_trials: int, runner: TrialRunner) -> None:
        self.reconcile(None)
        while self.finished_count() + self.pending_elsewhere() < n_trials:
            claimed = self.pop()
            if claimed is None:
                trial = self.study.ask()
                claimed = self.storage.get_trial(trial._trial_id)
            ask = optuna.trial.Trial(self.study, claimed._trial_id)
            # A re-queued point's params are fixed in the trial: suggest_* returns them.
            batch_size = ask.suggest_int(
                "batch_size", space.min_batch_size, space.max_batch_size, log=True
            )
            lr = ask.suggest_float("learning_rate", space.min_lr, space.max_lr, log=True)
            point = GridPoint(int(batch_size), SEARCH_RULE, float(lr))
            if books.trial_key(claimed) is None:
                self.storage.set_trial_user_attr(claimed._trial_id, books.KEY, point.key)
                self.storage.set_trial_user_attr(claimed._trial_id, books.POINT, point.to_dict())
            self._run_claimed(self.storage.get_trial(claimed._trial_id), point, runner)

    def _run_claimed(self, trial: FrozenTrial, point: GridPoint, runner: TrialRunner) -> None:
        trial_id = trial._trial_id
        with books.Heartbeat(self.storage, trial_id, self.owner, self.options.heartbeat_interval):
            if books.is_duplicate_claim(trial, self.trials(), self.liveness):
                self.storage.set_trial_system_attr(trial_id, books.OUTCOME, books.DUPLICATE)
                self.study.tell(trial.number, state=TrialState.FAIL)
                # Two workers that collided would collide again at once; stagger them.
                time.sleep(random.random())
                return
            reporter = optuna.trial.Trial(self.study, trial_id)

            def on_eval(evaluation: EvalPoint, record: TrialRecord) -> bool:
                reporter.report(evaluation.metric, evaluation.index)
                return self.options.pruning and reporter.should_prune()

            try:
                record = runner(point, on_eval)
            except BaseException as exc:
                outcome = "error" if isinstance(exc, Exception) else "interrupted"
                self.storage.set_trial_system_attr(trial_id, books.OUTCOME, outcome)
                self.study.tell(trial.number, state=TrialState.FAIL)
                raise
            record.extra.update(trial_number=trial.number, worker=self.owner.to_dict())
            self.storage.set_trial_user_attr(trial_id, books.RECORD, to_jsonable(record.to_dict()))
            self.storage.set_trial_system_attr(trial_id, books.OUTCOME, record.outcome)
            self._tell(trial.number, record)

    def _tell(self, number: int, record: TrialRecord) -> None:
        final = record.final_metric
        if record.outcome == "complete" and final is not None and final == final:
            self.study.tell(number, final)
        elif record.outcome == "pruned":
            self.study.tell(number, state=TrialState.PRUNED)
        else:
            self.study.tell(number, state=TrialState.FAIL)

    # -- results ------------------------------------------------------------------------------

    def records(self, keys: set[str] | None = None) -> list[TrialRecord]:
        """The finished trial of each point (the lowest-numbered one, should there be two)."""
        chosen: dict[str, TrialRecord] = {}
        for trial in sorted(self.trials(), key=lambda t: t.number):
            key, raw = books.trial_key(trial), trial.user_attrs.get(books.RECORD)
            if key is None or raw is None or not books.is_finished(trial):
                continue
            if (keys is None or key in keys) and key not in chosen:
                chosen[key] = TrialRecord.from_dict(raw)
        return list(chosen.values())


def with_installed_driver(url: str) -> str:
    """`postgresql://` means psycopg 3 to SQLAlchemy 2.1 but psycopg2 to older ones; name the
    driver that is installed (psycopg2-binary is what `batchscope[postgres]` installs)."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return f"postgresql+psycopg2{sep}{rest}"
    return f"postgresql{sep}{rest}"


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split("@", 1)[0].split(":", 1)[0]
        rest = f"{user}:***@{rest.split('@', 1)[1]}"
    return f"{scheme}{sep}{rest}" if sep else url
