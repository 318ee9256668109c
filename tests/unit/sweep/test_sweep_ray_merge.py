"""The Ray backend's pure parts: merging a Ray result, ASHA's rungs, the missing-Ray hint."""

import json
import sys

import pytest

from batchscope.errors import UsageError
from batchscope.sweep.ray_backend import RAY_HINT, import_ray, merge_result, scheduler_settings
from batchscope.sweep.trial_record import EvalPoint, TrialRecord, TrialSettings


def _metrics(curve, outcome="complete"):
    record = TrialRecord("b32-linear", 32, "linear", 0.1, 0, 16, 32, 0, outcome=outcome,
                         train_seconds=curve[-1].train_seconds if curve else 0.0,
                         samples_seen=curve[-1].samples_seen if curve else 0, curve=curve)
    return {"record": json.dumps(record.to_dict()), "time_total_s": 7.5, "trial_id": "abc"}


def test_a_trial_stopped_between_reports_is_pruned_and_off_budget():
    settings = TrialSettings(epochs=2, evals_per_epoch=1)
    merged = merge_result(_metrics([EvalPoint(1, 1.0, 16, 512, 2.0, 0.3, 2.1)]), settings, True)
    assert merged.outcome == "pruned" and not merged.full_budget
    assert merged.final_metric == 0.3 and merged.wall_seconds == 7.5
    assert merged.samples_per_second == pytest.approx(256.0)
    assert merged.extra == {"backend": "ray", "trial_id": "abc"}


def test_a_full_trial_keeps_its_curve_and_a_diverged_one_its_outcome():
    settings = TrialSettings(epochs=2, evals_per_epoch=1)
    curve = [EvalPoint(1, 1.0, 16, 512, 2.0, 0.3, 2.1), EvalPoint(2, 2.0, 32, 1024, 4.0, 0.4, 1.9)]
    merged = merge_result(_metrics(curve), settings, True)
    assert merged.outcome == "complete" and merged.full_budget and merged.best_metric == 0.4
    diverged = merge_result(_metrics(curve[:1], outcome="diverged"), settings, True)
    assert diverged.outcome == "diverged" and not diverged.full_budget


def test_a_result_without_a_record_is_an_error():
    with pytest.raises(UsageError, match="without reporting"):
        merge_result({}, TrialSettings(epochs=1), True)


def test_asha_rungs_start_after_one_epoch_and_end_at_the_budget():
    assert scheduler_settings(TrialSettings(epochs=3, evals_per_epoch=2)) == {
        "max_t": 6, "grace_period": 2, "reduction_factor": 3}
    assert scheduler_settings(TrialSettings(epochs=1, evals_per_epoch=4))["grace_period"] == 4


def test_without_ray_the_error_is_the_exact_pip_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(UsageError) as error:
        import_ray()
    assert str(error.value) == RAY_HINT == "the ray backend needs Ray Tune: pip install 'batchscope[ray]'"


def _spec(tmp_path, points=None, space=None, n_trials=None):
    import torch

    from batchscope.sweep.ray_backend import RaySweepSpec

    return RaySweepSpec(
        workload="w", workload_options={}, settings=TrialSettings(epochs=1, seed=5), points=points,
        space=space, n_trials=n_trials, device=torch.device("cpu"), pruning=False,
        higher_is_better=True, storage_dir=tmp_path, name="study",
    )


def _saved(key, batch_size, rule, lr, outcome="complete", final=0.5, full=True):
    return TrialRecord(key, batch_size, rule, lr, 0, 8, 8, 0, outcome=outcome,
                       final_metric=final, full_budget=full)


def test_a_rerun_of_a_grid_runs_only_the_points_without_a_saved_record(tmp_path):
    from batchscope.sweep.grid import grid_points
    from batchscope.sweep.ray_backend import remaining_work

    points = grid_points([16, 32, 64], ["linear"])
    saved = [_saved("b32-linear", 32, "linear", 1.0, outcome="pruned", full=False),
             _saved("b128-linear", 128, "linear", 4.0)]  # not in this grid: not reported
    work = remaining_work(_spec(tmp_path, points=points), saved)
    assert [p.key for p in work.points] == ["b16-linear", "b64-linear"]
    assert work.samples == 2 and [r.key for r in work.kept] == ["b32-linear"]
    done = remaining_work(_spec(tmp_path, points=points), saved + [
        _saved("b16-linear", 16, "linear", 0.5), _saved("b64-linear", 64, "linear", 2.0)])
    assert done.samples == 0 and done.points == []


def test_a_rerun_of_a_search_tops_up_n_trials_with_a_new_seed_and_the_history(tmp_path):
    from batchscope.sweep.grid import SearchSpace
    from batchscope.sweep.ray_backend import remaining_work

    space = SearchSpace(8, 64, 0.01, 1.0)
    saved = [_saved("b16-lr0.1", 16, "search", 0.1, final=0.7),
             _saved("b40-lr0.3", 40, "search", 0.3, outcome="pruned", final=0.2, full=False)]
    work = remaining_work(_spec(tmp_path, space=space, n_trials=5), saved)
    assert work.points is None and work.samples == 3 and len(work.kept) == 2
    assert work.search_seed == 5 + 2  # the first run's seed would draw its points again
    assert work.history == [({"batch_size": 16, "learning_rate": 0.1}, 0.7)]  # full budget only
    assert remaining_work(_spec(tmp_path, space=space, n_trials=2), saved).samples == 0


def test_a_finished_sweep_starts_no_ray_at_all(tmp_path, monkeypatch):
    from batchscope.sweep import ray_backend
    from batchscope.sweep.grid import grid_points
    from batchscope.sweep.trial_store import TrialStore

    spec = _spec(tmp_path, points=grid_points([16], ["none"]))
    TrialStore(spec.records_dir, "study").save(_saved("b16-none", 16, "none", 0.5))
    monkeypatch.setitem(sys.modules, "ray", None)  # any use of Ray would fail
    run = ray_backend.run_ray_sweep(spec)
    assert [r.key for r in run.records] == ["b16-none"] and run.failures == []


def test_a_trial_error_is_named_by_its_innermost_exception_in_one_line():
    from batchscope.sweep.ray_backend import describe_error

    class WrappedTaskError(Exception):  # Ray's wrapper: a traceback text and the real cause
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n  File ...\nValueError: bad")
            self.cause = cause

    assert describe_error(WrappedTaskError(ValueError("bad\nbatch"))) == "ValueError: batch"
    chained = RuntimeError("outer")
    chained.__cause__ = KeyError("inner")
    assert describe_error(chained) == "KeyError: 'inner'"
    assert describe_error(RuntimeError()) == "RuntimeError"


def test_the_callback_saves_each_finished_trial_as_it_ends(tmp_path):
    pytest.importorskip("ray.tune")
    from types import SimpleNamespace

    from batchscope.sweep.ray_backend import _record_saver
    from batchscope.sweep.trial_store import TrialStore

    store = TrialStore(tmp_path, "study")
    saver = _record_saver(store, TrialSettings(epochs=2, evals_per_epoch=1), True)
    one_report = _metrics([EvalPoint(1, 1.0, 16, 512, 2.0, 0.3, 2.1)])  # then ASHA stopped it
    saver.on_trial_complete(0, [], SimpleNamespace(last_result=one_report))
    saver.on_trial_complete(0, [], SimpleNamespace(last_result={}))  # never reported: nothing
    (saved,) = store.load()
    assert (saved.key, saved.outcome, saved.wall_seconds) == ("b32-linear", "pruned", 7.5)
