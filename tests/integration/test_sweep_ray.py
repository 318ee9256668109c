"""Real sweeps on Ray Tune, on one local 2-CPU cluster for the module: trials merged into the
sweep's record format, ASHA early stopping on the samples grid, resume from the saved JSON
records, and a failing trial that costs no other trial's result."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray", reason="Ray Tune is not installed (pip install 'batchscope[ray]')")
pytest.importorskip("ray.tune", reason="Ray Tune is not installed (pip install 'batchscope[ray]')")

FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "sweep"  # sweep_fixtures.py


@pytest.fixture(scope="module")
def local_cluster():
    # Workers resolve an entry point by importing it: they inherit PYTHONPATH from ray.init.
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(FIXTURES), before) if p)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    yield
    ray.shutdown()


def _ray_trial_dirs(out: Path, study: str) -> list[str]:
    return sorted(p.name for p in (out / "ray" / study).glob("_ray_trial_*"))


def test_ray_sweep_merges_trials_into_the_record_format_with_asha(local_cluster, tmp_path):
    from batchscope.record import RunRecord
    from batchscope.sweep import sweep

    kwargs = dict(
        lr_rule="linear", epochs=2, evals_per_epoch=1, target_metric=0.12, backend="ray",
        device="cpu", out_dir=tmp_path, pruning=True,
        workload_options={"train_size": 512, "test_size": 128}, report=False,
    )
    result = sweep("small-cnn-cifar10", [32, 64], **kwargs)
    assert result.config["early_stopping"] == {
        "name": "ASHA", "time_attr": "eval_index", "metric": "metric",
        "max_t": 2, "grace_period": 1, "reduction_factor": 3,
    }
    assert [t.key for t in result.trials] == ["b32-linear", "b64-linear"]
    for trial in result.trials:
        assert trial.extra["backend"] == "ray"
        assert trial.outcome in ("complete", "pruned")  # ASHA may stop the worse one at rung 1
        assert [p.index for p in trial.curve] == list(range(1, len(trial.curve) + 1))
        assert [p.samples_seen for p in trial.curve] == [512, 1024][: len(trial.curve)]
        assert trial.full_budget == (trial.outcome == "complete" and len(trial.curve) == 2)
        assert trial.final_metric == trial.curve[-1].metric
        assert trial.wall_seconds > 0 and trial.samples_per_second > 0
    full = {t.key for t in result.trials if t.full_budget}
    assert full and set(result.front) <= full  # only full-budget trials compete
    record = RunRecord.load(tmp_path / "run.json")
    assert record.sections["sweep"]["config"]["backend"] == "ray"
    assert len(record.sections["sweep"]["trials"]) == 2

    # The same sweep again: every trial (a pruned one too) comes from its saved record, and
    # Ray runs no trial.
    trial_dirs = _ray_trial_dirs(tmp_path, "small-cnn-cifar10-grid")
    assert len(trial_dirs) == 2
    again = sweep("small-cnn-cifar10", [32, 64], **kwargs)
    assert [t.to_dict() for t in again.trials] == [t.to_dict() for t in result.trials]
    assert again.front == result.front
    assert _ray_trial_dirs(tmp_path, "small-cnn-cifar10-grid") == trial_dirs


def test_a_failing_trial_keeps_the_others_and_a_rerun_runs_only_it(local_cluster, tmp_path, monkeypatch):
    from batchscope.record import RunRecord
    from batchscope.sweep import SweepTrialsFailed, sweep

    monkeypatch.syspath_prepend(str(FIXTURES))  # the driver resolves the entry point too
    kwargs = dict(lr_rule="linear", epochs=1, evals_per_epoch=1, backend="ray", device="cpu",
                  out_dir=tmp_path, pruning=False, report=False)
    with pytest.raises(SweepTrialsFailed) as failed:
        sweep("sweep_fixtures:tiny_failing_above_16", [16, 32], **kwargs)
    error = "RuntimeError: batch 32 is too large for this test"
    assert [(f.key, f.error) for f in failed.value.failures] == [("b32-linear", error)]
    assert str(failed.value).startswith(f"1 trial(s) failed (b32-linear: {error}); the 1 finished")
    # The finished trial was not thrown away: it is in the result and in the files.
    (kept,) = failed.value.result.trials
    assert (kept.key, kept.outcome) == ("b16-linear", "complete")
    section = RunRecord.load(tmp_path / "run.json").sections["sweep"]
    assert [t["key"] for t in section["trials"]] == ["b16-linear"]
    assert any(note.startswith(f"Trial b32-linear failed ({error})") for note in section["notes"])

    fixed = sweep("sweep_fixtures:tiny_workload", [16, 32], **kwargs)
    assert [t.key for t in fixed.trials] == ["b16-linear", "b32-linear"]
    assert fixed.trials[0].to_dict() == kept.to_dict()  # reused, not trained again
    assert len(_ray_trial_dirs(tmp_path, "tiny-classify-grid")) == 3  # 2 first, then only b32
