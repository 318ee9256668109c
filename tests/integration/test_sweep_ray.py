"""A real sweep on Ray Tune, on a local 2-CPU cluster: trials merged into the sweep's record
format, ASHA early stopping on the samples grid."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray", reason="Ray Tune is not installed (pip install 'batchscope[ray]')")
pytest.importorskip("ray.tune", reason="Ray Tune is not installed (pip install 'batchscope[ray]')")


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_sweep_merges_trials_into_the_record_format_with_asha(local_cluster, tmp_path):
    from batchscope.record import RunRecord
    from batchscope.sweep import sweep

    result = sweep(
        "small-cnn-cifar10", [32, 64], lr_rule="linear", epochs=2, evals_per_epoch=1,
        target_metric=0.12, backend="ray", device="cpu", out_dir=tmp_path, pruning=True,
        workload_options={"train_size": 512, "test_size": 128}, report=False,
    )
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
