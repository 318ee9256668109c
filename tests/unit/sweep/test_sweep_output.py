import csv
import json

import pytest

from batchscope.errors import UsageError
from batchscope.record import RunRecord
from batchscope.sweep.output import predicted_from_record, write_outputs
from batchscope.sweep.plots import sweep_figures
from batchscope.sweep.results import SweepResult
from batchscope.sweep.trial_record import EvalPoint, TrialRecord


def _trial(batch, rule, metrics, outcome="complete", seconds_per_point=1.0):
    curve = [
        EvalPoint(i + 1, (i + 1) / 2, (i + 1) * 256 // batch, (i + 1) * 256, (i + 1) * seconds_per_point, m, 1.0)
        for i, m in enumerate(metrics)
    ]
    record = TrialRecord(
        key=f"b{batch}-{rule}", batch_size=batch, lr_rule=rule, learning_rate=0.1 * batch / 64,
        warmup_steps=0, steps_per_epoch=512 // batch, total_steps=1024 // batch, seed=0,
        outcome=outcome, curve=curve, train_seconds=curve[-1].train_seconds if curve else 0.0,
    )
    record.final_metric = metrics[-1] if metrics else None
    record.full_budget = outcome == "complete" and len(metrics) == 4
    return record


@pytest.fixture
def result():
    trials = [
        _trial(32, "linear", [0.3, 0.5, 0.6, 0.7], seconds_per_point=2.0),
        _trial(64, "linear", [0.3, 0.45, 0.55, 0.65]),
        _trial(64, "sqrt", [0.2, 0.3, 0.4, 0.5]),
        _trial(128, "linear", [0.1], outcome="pruned"),
        _trial(256, "linear", [], outcome="diverged"),
    ]
    built = SweepResult.build(trials, higher_is_better=True, target_metric=0.5,
                              metric_name="accuracy", config={"epochs": 2, "backend": "optuna"},
                              predicted_batch_size=64)
    return built


def test_front_of_the_fixture(result):
    # time to 0.5: b32 4.0s (0.7 final), b64-linear 3.0s (0.65), b64-sqrt 4.0s (0.5): dominated
    assert result.front == ["b64-linear", "b32-linear"]


def test_every_file_is_written_and_the_record_holds_the_sweep(tmp_path, result):
    workload = {"name": "evil <script>alert(1)</script>"}
    paths = write_outputs(result, tmp_path, workload=workload, environment={"device": "cpu"})
    record = RunRecord.load(paths["record"])
    assert record.kind == "sweep"
    section = record.sections["sweep"]
    assert [t["key"] for t in section["trials"]] == [t.key for t in result.trials]
    assert section["front"] == ["b64-linear", "b32-linear"]
    assert section["predicted_batch_size"] == 64
    assert SweepResult.from_dict(section).front == result.front
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 5 and rows[-1]["outcome"] == "diverged"
    html = open(paths["html"]).read()
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert html.count("<svg") == 5
    assert "predicted by tune (64)" in html
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert len(figures) == 10 and sum(name.endswith(".png") for name in figures) == 5
    json.loads(open(paths["record"]).read())  # strict JSON (no NaN)


def test_no_curves_means_no_figures():
    empty = SweepResult.build([], higher_is_better=True, target_metric=None, metric_name="accuracy")
    assert sweep_figures(empty) == []


def test_predicted_batch_size_is_read_from_a_tune_record(tmp_path):
    tune = RunRecord(kind="tune", workload={}, environment={},
                     sections={"recommendation": {"batch_size": 256}})
    tune.save(tmp_path / "tune.json")
    assert predicted_from_record(tmp_path / "tune.json") == 256
    RunRecord(kind="probe-memory", workload={}, environment={}).save(tmp_path / "memory.json")
    with pytest.raises(UsageError, match=r"recommendation\.batch_size=None must be a positive "
                                         r"integer \(in run record .*memory\.json' of kind "
                                         r"'probe-memory'; pass the record of a `batchscope tune`"):
        predicted_from_record(tmp_path / "memory.json")


def test_the_shared_reference_trial_starts_every_rules_line():
    # The grid trains the reference batch (32 here) once, as b32-linear; the sqrt line of the
    # final-metric plot must still start there rather than at 64.
    from batchscope.sweep.plots import final_metric_figure, time_figure

    trials = [
        _trial(32, "linear", [0.3, 0.5, 0.6, 0.7]),
        _trial(64, "linear", [0.3, 0.45, 0.55, 0.65]),
        _trial(64, "sqrt", [0.2, 0.3, 0.4, 0.5]),
    ]
    built = SweepResult.build(trials, higher_is_better=True, target_metric=None,
                              metric_name="accuracy", config={"reference_batch_size": 32})
    for figure in (final_metric_figure(built), time_figure(built)):
        lines = {line.get_label(): list(line.get_xdata()) for line in figure.axes[0].get_lines()}
        assert lines["LR rule: linear"] == [32, 64]
        assert lines["LR rule: sqrt"] == [32, 64]
    unshared = SweepResult.build(trials, higher_is_better=True, target_metric=None,
                                 metric_name="accuracy", config={"reference_batch_size": 16})
    lines = {line.get_label(): list(line.get_xdata())
             for line in final_metric_figure(unshared).axes[0].get_lines()}
    assert lines["LR rule: sqrt"] == [64]


def test_report_marks_a_prediction_given_after_the_sweep(tmp_path, result, capsys):
    # tune ran after the sweep: `batchscope report run.json --predicted tune/run.json` marks its
    # batch on the re-rendered plots and leaves the record as the sweep wrote it.
    from batchscope.cli.main import run

    paths = write_outputs(result, tmp_path, workload={"name": "w"}, environment={})
    tune = RunRecord(kind="tune", workload={}, environment={},
                     sections={"recommendation": {"batch_size": 32}})
    tune.save(tmp_path / "tune.json")
    with pytest.raises(SystemExit) as done:
        run(["report", paths["record"], "--predicted", str(tmp_path / "tune.json"),
             "--html", str(tmp_path / "again.html")])
    assert done.value.code == 0
    assert "predicted by tune (32)" in (tmp_path / "again.html").read_text()
    assert RunRecord.load(paths["record"]).sections["sweep"]["predicted_batch_size"] == 64
    with pytest.raises(SystemExit) as refused:
        run(["report", str(tmp_path / "tune.json"), "--predicted", "32"])
    assert refused.value.code == 2
    assert "--predicted marks tune's batch on a sweep's plots" in capsys.readouterr().err
