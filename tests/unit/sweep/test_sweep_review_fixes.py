"""Checks made before a sweep runs (--out, --storage, --seed), what a Ray trial asks for, and
how a trial that reached the target is treated by pruning and by the ranking."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from batchscope.cli.main import run
from batchscope.errors import UsageError
from batchscope.sweep import api
from batchscope.sweep.api import resources_note, trial_runner
from batchscope.sweep.grid import GridPoint
from batchscope.sweep.ray_backend import node_cpu_counts, trial_resources
from batchscope.sweep.results import SweepResult
from batchscope.sweep.trial_record import EvalPoint, TrialRecord, TrialSettings

ENTRY = "sweep_fixtures:tiny_workload"
CPU = torch.device("cpu")


@pytest.fixture
def cli(tiny, tmp_path, monkeypatch, capsys):
    """`batchscope sweep -w <tiny> -b 16 ...` through the real entry point, in tmp_path, with
    training and Ray made to fail the test: every case here must stop before either."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(api, "run_trial", lambda *a, **k: pytest.fail("a trial trained"))
    monkeypatch.setitem(sys.modules, "ray", None)

    def invoke(*args: str) -> SimpleNamespace:
        capsys.readouterr()
        with pytest.raises(SystemExit) as excinfo:
            run(["sweep", "-w", ENTRY, "-b", "16", "--no-report", *args])
        output = capsys.readouterr()
        return SimpleNamespace(exit_code=excinfo.value.code, stdout=output.out, stderr=output.err)

    return invoke


def _refused(result: SimpleNamespace, message: str) -> None:
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", f"error: {message}\n")


@pytest.mark.parametrize("backend", ["optuna", "ray"])
def test_an_out_that_is_a_file_or_under_one_is_refused_up_front(cli, tmp_path, backend):
    (tmp_path / "afile").write_text("mine")
    fix = "pass --out a writable directory (new or existing)"
    _refused(cli("--out", "afile", "--backend", backend),
             f"--out 'afile' is a file, not a directory; {fix}")
    _refused(cli("--out", "afile/sub", "--backend", backend),
             f"--out 'afile/sub' cannot be created: 'afile' is a file; {fix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_journal_under_a_file_is_refused_before_out_is_created(cli, tmp_path):
    (tmp_path / "afile").write_text("")
    _refused(cli("--out", "sw", "--storage", "afile/journal.log"),
             "--storage 'afile/journal.log' cannot be created: 'afile' is a file; pass "
             "--storage a journal file in a writable directory, or a database URL")
    assert not (tmp_path / "sw").exists()


def test_a_journal_that_is_a_directory_is_refused_before_out_is_created(cli, tmp_path):
    (tmp_path / "jdir").mkdir()
    _refused(cli("--out", "sw", "--storage", "jdir"),
             "--storage 'jdir' is a directory; pass a journal file path, e.g. "
             "'jdir/optuna-journal.log', or a database URL")
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("backend", ["optuna", "ray"])
@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_outside_numpys_range_is_refused_before_anything_is_created(cli, tmp_path, backend, seed):
    _refused(cli("--seed", seed, "--out", "sw", "--backend", backend),
             f"seed={seed} must be an integer from 0 to 4294967295 (--seed, e.g. 0)")
    assert not (tmp_path / "sw").exists()


def test_the_largest_seed_numpy_accepts_is_kept():
    assert TrialSettings(epochs=1, seed=2**32 - 1).seed == 4294967295


def test_storage_with_the_ray_backend_is_refused_naming_what_ray_uses(cli, tmp_path):
    _refused(cli("--backend", "ray", "--storage", "postgresql://me:secret@db/sweeps", "--out", "sw"),
             "storage='postgresql://me:***@db/sweeps' is for --backend optuna only; the ray "
             "backend keeps its trials in --out (<out>/ray), so drop --storage or use "
             "--backend optuna")
    assert not (tmp_path / "sw").exists()


def test_a_cpu_trial_asks_for_a_whole_machine_and_a_gpu_trial_for_one_gpu():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 2.0}},
        {"Alive": True, "Resources": {"CPU": 8.0}},
        {"Alive": False, "Resources": {"CPU": 2.0}},  # dead: runs nothing
        {"Alive": True, "Resources": {"memory": 1e9}},  # a head started with --num-cpus=0
    ]
    assert node_cpu_counts(nodes) == [16.0, 8.0]
    # the smallest node's cores: every node runs one trial at a time, none shares its cores
    assert trial_resources(CPU, [16.0, 8.0]) == {"cpu": 8.0}
    assert trial_resources(CPU, []) == {"cpu": 1}
    assert trial_resources(torch.device("cuda"), [16.0, 8.0]) == {"gpu": 1, "cpu": 1}


def test_the_notes_say_how_many_trials_a_machine_ran_at_once():
    assert resources_note({"cpu": 2.0}) == (
        "Ray gave each trial 2 CPUs, all the cores of the smallest machine, so that machine runs "
        "one trial at a time (a larger one as many as its cores hold): trials sharing cores "
        "would slow each other and skew samples/s and time to target.")
    assert resources_note({"cpu": 1}).startswith("Ray gave each trial 1 CPU, all the cores")
    assert resources_note({"gpu": 1, "cpu": 1}) == (
        "Ray ran one trial per GPU at a time (1 GPU and 1 CPU each).")


@pytest.mark.parametrize(("target", "outcome", "evaluations"),
                         [(None, "pruned", 1), (1.01, "pruned", 1), (0.0, "complete", 4)])
def test_the_pruner_cannot_stop_a_trial_that_reached_the_target(tiny, target, outcome, evaluations):
    settings = TrialSettings(epochs=2, target_metric=target)  # accuracy 0.0 is reached at once
    asked = []

    def always_prune(evaluation, record):
        asked.append(evaluation.index)
        return True

    record = trial_runner(tiny(), settings, CPU, None)(GridPoint(16, "none"), always_prune)
    assert (record.outcome, len(record.curve)) == (outcome, evaluations)
    assert asked == list(range(1, evaluations + 1))  # the pruner still hears every evaluation


def test_ray_asha_keeps_a_trial_that_reported_reaching_the_target():
    pytest.importorskip("ray.tune")
    from ray.tune.schedulers import TrialScheduler

    from batchscope.sweep.ray_backend import target_keeping_asha

    def decisions(reached: bool) -> list[str]:
        asha = target_keeping_asha(max_t=4, grace_period=1, reduction_factor=3,
                                   metric="metric", mode="max")
        leader, behind = SimpleNamespace(trial_id="leader"), SimpleNamespace(trial_id="behind")
        for trial in (leader, behind):
            asha.on_trial_add(None, trial)
        asha.on_trial_result(None, leader, {"eval_index": 1, "metric": 0.9})
        return [asha.on_trial_result(None, behind, {"eval_index": 1, "metric": 0.5,
                                                    "reached_target": reached})]

    assert decisions(False) == [TrialScheduler.STOP]
    assert decisions(True) == [TrialScheduler.CONTINUE]


def _trial(key, outcome, curve, full):
    return TrialRecord(key, 32, "linear", 0.1, 0, 4, 8, 0, outcome=outcome,
                       final_metric=curve[-1].metric, full_budget=full, curve=curve)


def test_a_pruned_trial_that_reached_the_target_sooner_is_named_not_silently_ranked_below():
    slow = _trial("b32-linear", "complete", [EvalPoint(1, 1.0, 4, 128, 2.3, 0.25, 2.0),
                                             EvalPoint(2, 2.0, 8, 256, 4.6, 0.35, 1.8)], True)
    quick = _trial("b128-sqrt", "pruned", [EvalPoint(1, 1.0, 4, 512, 1.36, 0.31, 2.0)], False)
    result = SweepResult.build([slow, quick], higher_is_better=True, target_metric=0.3,
                               metric_name="accuracy")
    assert result.best().key == "b32-linear"
    assert result.notes == [
        "b128-sqrt (pruned, 1.36 s) reached the target sooner than the front's fastest "
        "b32-linear (4.6 s), but ended before their budget, so they are not ranked: final "
        "metrics compare only at the full budget (a new --study trains pruned ones to the end: "
        "a trial at the target is not pruned)"]
    # nothing to explain when the unranked trial was slower, or without a target
    quick.curve[0].train_seconds = 9.0
    assert SweepResult.build([slow, quick], higher_is_better=True, target_metric=0.3,
                             metric_name="accuracy").notes == []
    assert SweepResult.build([slow, quick], higher_is_better=True, target_metric=None,
                             metric_name="accuracy").notes == []


@pytest.mark.parametrize("target", [float("nan"), float("inf"), "0.5"])
def test_a_target_metric_that_is_not_a_finite_number_is_refused(target):
    with pytest.raises(UsageError, match=r"target_metric=.* must be a finite number"):
        TrialSettings(epochs=1, evals_per_epoch=1, seed=0, target_metric=target)


def test_a_piped_sweep_table_keeps_every_trial_name_whole(capsys):
    from batchscope.cli.sweep_cmd import render

    trials = [_trial(f"b{batch}-linear", "complete", [EvalPoint(1, 1.0, 4, 128, 2.3, 0.25, 2.0)],
                     True) for batch in (32, 1024)]
    trials[1].batch_size = 1024
    render(SweepResult.build(trials, higher_is_better=True, target_metric=None,
                             metric_name="accuracy"))
    out = capsys.readouterr().out  # not a terminal: rich would have cut to 80 columns
    assert "b1024-linear" in out and "b32-linear" in out and "…" not in out, out
