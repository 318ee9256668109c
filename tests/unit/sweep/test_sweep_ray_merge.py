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
