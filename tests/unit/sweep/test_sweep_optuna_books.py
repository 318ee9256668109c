"""The Optuna backend's bookkeeping, with a fake trial runner: which points run, how often."""

import os
import time

import optuna
import psutil
import pytest
from optuna.trial import TrialState

from batchscope.errors import UsageError
from batchscope.sweep import bookkeeping as books
from batchscope.sweep.grid import GridPoint, grid_points
from batchscope.sweep.optuna_backend import (
    OptunaOptions,
    OptunaSweep,
    open_storage,
    open_study,
    redact_url,
    with_installed_driver,
)
from batchscope.sweep.trial_record import EvalPoint, TrialRecord

POINTS = grid_points([16, 32, 64], ["linear"])
CONFIG = {"workload": "fake", "epochs": 1}


class FakeRunner:
    """Reports `metric(point)` at 3 evaluation points (stopping when told to) and counts runs."""

    def __init__(self, metric=lambda point: 0.5):
        self.metric = metric
        self.runs = []

    def __call__(self, point, on_eval):
        self.runs.append(point.key)
        record = TrialRecord(point.key, point.batch_size, point.lr_rule, 0.1, 0, 4, 12, 0)
        for index in (1, 2, 3):
            evaluation = EvalPoint(index, index / 3, index * 4, index * 4 * point.batch_size,
                                   float(index), self.metric(point), 1.0)
            record.curve.append(evaluation)
            if on_eval(evaluation, record):
                record.outcome = "pruned"
                break
        record.final_metric = record.curve[-1].metric
        record.full_budget = record.outcome == "complete"
        return record


def _worker(tmp_path, pruning=False, config=CONFIG, name="s"):
    storage = open_storage(None, tmp_path)
    options = OptunaOptions(study_name=name, pruning=pruning, grace_seconds=60.0)
    study = open_study(storage, options, higher_is_better=True, config=config, search=False)
    return OptunaSweep(study, storage, options)


def _states_by_key(worker):
    states = {}
    for trial in worker.trials():
        states.setdefault(books.trial_key(trial), []).append(
            (trial.state, books.outcome_of(trial))
        )
    return states


def _claim_as(worker, point, owner):
    """Queue `point` and leave it RUNNING as if `owner` had claimed it."""
    worker._enqueue(point)
    trial = worker.pop()
    worker.storage.set_trial_system_attr(trial._trial_id, books.OWNER, owner)
    return trial


def _dead_owner():
    me = books.Owner.current()
    return {**me.to_dict(), "started": me.started - 1000.0}  # same PID, another process's start


def test_every_grid_point_runs_once_and_a_rerun_runs_nothing(tmp_path):
    runner = FakeRunner()
    worker = _worker(tmp_path)
    worker.run_grid(POINTS, runner)
    assert sorted(runner.runs) == sorted(p.key for p in POINTS)
    assert {k: v for k, v in _states_by_key(worker).items()} == {
        p.key: [(TrialState.COMPLETE, "complete")] for p in POINTS
    }
    again = FakeRunner()
    resumed = _worker(tmp_path)
    resumed.run_grid(POINTS, again)
    assert again.runs == []
    assert sorted(r.key for r in resumed.records()) == sorted(p.key for p in POINTS)


def test_a_trial_left_running_by_a_dead_process_is_failed_and_rerun_once(tmp_path):
    worker = _worker(tmp_path)
    _claim_as(worker, POINTS[1], _dead_owner())
    runner = FakeRunner()
    worker.run_grid(POINTS, runner)
    assert sorted(runner.runs) == sorted(p.key for p in POINTS)
    states = _states_by_key(worker)
    assert states[POINTS[1].key] == [(TrialState.FAIL, "stale"), (TrialState.COMPLETE, "complete")]
    # reconciling again queues nothing: the point is finished
    assert worker.reconcile(POINTS) == 0


def test_a_point_running_on_a_live_worker_is_left_to_it(tmp_path):
    parent = psutil.Process(os.getppid())
    me = books.Owner.current()
    live = {**me.to_dict(), "pid": parent.pid, "started": parent.create_time()}
    worker = _worker(tmp_path)
    _claim_as(worker, POINTS[0], live)
    runner = FakeRunner()
    worker.run_grid(POINTS, runner)
    assert sorted(runner.runs) == sorted(p.key for p in POINTS[1:])
    assert _states_by_key(worker)[POINTS[0].key] == [(TrialState.RUNNING, None)]
    assert worker.pending_elsewhere() == 1


def test_remote_owners_are_judged_by_their_heartbeat(tmp_path):
    worker = _worker(tmp_path)
    remote = {"host": "elsewhere", "pid_namespace": "x", "pid": 1, "started": 1.0}
    old = _claim_as(worker, POINTS[0], remote)
    fresh = _claim_as(worker, POINTS[1], remote)
    worker.storage.set_trial_system_attr(old._trial_id, books.HEARTBEAT, time.time() - 61)
    worker.storage.set_trial_system_attr(fresh._trial_id, books.HEARTBEAT, time.time() - 5)
    trials = {t.number: t for t in worker.trials()}
    assert worker.liveness.is_stale(trials[old.number])
    assert not worker.liveness.is_stale(trials[fresh.number])


def test_a_finished_but_unreported_trial_is_salvaged_not_rerun(tmp_path):
    worker = _worker(tmp_path)
    trial = _claim_as(worker, POINTS[0], _dead_owner())
    record = FakeRunner(lambda p: 0.75)(POINTS[0], lambda e, r: False)
    worker.storage.set_trial_user_attr(trial._trial_id, books.RECORD, record.to_dict())
    worker.storage.set_trial_system_attr(trial._trial_id, books.OUTCOME, "complete")
    runner = FakeRunner()
    worker.run_grid(POINTS, runner)
    assert POINTS[0].key not in runner.runs
    salvaged = worker.storage.get_trial(trial._trial_id)
    assert salvaged.state == TrialState.COMPLETE and salvaged.value == 0.75


def test_a_queued_duplicate_of_a_finished_point_is_given_up_without_training(tmp_path):
    worker = _worker(tmp_path)
    worker.run_grid(POINTS[:1], FakeRunner())
    worker._enqueue(POINTS[0])  # e.g. two workers re-queued the same stale point
    runner = FakeRunner()
    worker.run_grid(POINTS[:1], runner)
    assert runner.runs == []
    assert _states_by_key(worker)[POINTS[0].key] == [
        (TrialState.COMPLETE, "complete"), (TrialState.FAIL, books.DUPLICATE)
    ]


def test_two_live_claims_of_one_point_both_see_the_other():
    liveness = books.Liveness(books.Owner.current(), 60.0)
    me = books.Owner.current().to_dict()

    def running(number):
        return optuna.trial.FrozenTrial(
            number=number, state=TrialState.RUNNING, value=None, datetime_start=None,
            datetime_complete=None, params={}, distributions={},
            user_attrs={books.KEY: "b16-linear"}, system_attrs={books.OWNER: me},
            intermediate_values={}, trial_id=number,
        )

    first, second = running(0), running(1)
    assert books.is_duplicate_claim(first, [first, second], liveness)
    assert books.is_duplicate_claim(second, [first, second], liveness)
    assert not books.is_duplicate_claim(first, [first], liveness)


def test_successive_halving_prunes_a_trial_worse_than_the_first_at_the_first_rung(tmp_path):
    worker = _worker(tmp_path, pruning=True)
    runner = FakeRunner(lambda point: 1.0 / point.batch_size)  # bigger batch = worse here
    worker.run_grid(POINTS[:2], runner)
    states = _states_by_key(worker)
    assert states["b16-linear"] == [(TrialState.COMPLETE, "complete")]
    assert states["b32-linear"] == [(TrialState.PRUNED, "pruned")]
    pruned = [r for r in worker.records() if r.key == "b32-linear"][0]
    assert len(pruned.curve) == 1 and pruned.outcome == "pruned"


def test_a_study_made_with_other_settings_is_refused(tmp_path):
    _worker(tmp_path)
    with pytest.raises(UsageError, match="different settings \\(epochs\\)"):
        _worker(tmp_path, config={**CONFIG, "epochs": 2})


def test_urls_get_the_installed_postgres_driver_and_are_redacted():
    url = "postgresql://user:secret@db:5432/x"
    assert with_installed_driver(url).endswith("://user:secret@db:5432/x")
    assert with_installed_driver("sqlite:///a.db") == "sqlite:///a.db"
    assert redact_url(url) == "postgresql://user:***@db:5432/x"
    assert "secret" not in redact_url(with_installed_driver(url))


def test_search_mode_runs_n_trials_and_reruns_a_stale_one_with_its_params(tmp_path):
    from batchscope.sweep.grid import SearchSpace

    storage = open_storage(None, tmp_path)
    options = OptunaOptions(study_name="search", pruning=False)
    study = open_study(storage, options, higher_is_better=True, config=CONFIG, search=True)
    worker = OptunaSweep(study, storage, options)
    stale_point = GridPoint(24, "search", 0.05)
    _claim_as(worker, stale_point, _dead_owner())
    runner = FakeRunner()
    worker.run_search(SearchSpace(16, 128, 0.01, 1.0), 4, runner)
    assert runner.runs[0] == stale_point.key and len(runner.runs) == 4
    assert worker.finished_count() == 4
    rerun = [t for t in worker.trials() if t.state == TrialState.COMPLETE and
             books.trial_key(t) == stale_point.key][0]
    assert rerun.params == {"batch_size": 24, "learning_rate": 0.05}
    for trial in worker.trials():
        if trial.state == TrialState.COMPLETE:
            assert 16 <= trial.params["batch_size"] <= 128


class _FlakyStorage:
    """Accepts the owner and the first heartbeat, then fails every later write."""

    def __init__(self):
        self.writes = 0

    def set_trial_system_attr(self, trial_id, key, value):
        self.writes += 1
        if self.writes > 2:
            raise ConnectionError("database went away")


def test_a_failed_heartbeat_is_logged_at_debug_and_the_trial_goes_on(caplog):
    caplog.set_level("DEBUG", logger="batchscope.sweep.bookkeeping")
    storage = _FlakyStorage()
    with books.Heartbeat(storage, 42, books.Owner.current(), interval=0.005):
        deadline = time.monotonic() + 10
        while storage.writes < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert storage.writes >= 4  # beats go on after a failure
    failures = [r for r in caplog.records if r.name == "batchscope.sweep.bookkeeping"]
    assert failures and all(r.levelname == "DEBUG" for r in failures)
    assert failures[0].getMessage() == (
        "heartbeat of trial 42 not written: ConnectionError('database went away')"
    )
