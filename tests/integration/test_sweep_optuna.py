"""Real sweeps of the small CNN on CIFAR-10 through Optuna with the default journal storage:
results and files, a no-op resume of a finished study, and a resume after `kill -9`."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from batchscope.record import RunRecord
from batchscope.sweep import bookkeeping as books
from batchscope.sweep import sweep
from batchscope.sweep.results import front_time

pytestmark = pytest.mark.slow

SMALL = {"train_size": 1024, "test_size": 256}
CHANCE = 0.1  # ten balanced classes


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a small CNN on a shared 2-core machine: no thread-pool waits
    yield
    torch.set_num_threads(before)


def _journal_trials(path: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def _dominates(a, b) -> bool:
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def test_real_sweep_writes_everything_and_its_front_is_pareto_optimal(tmp_path, one_thread):
    result = sweep(
        "small-cnn-cifar10", [64, 128], lr_rule="linear", epochs=2, target_metric=0.15,
        out_dir=tmp_path, pruning=False, workload_options=SMALL, device="cpu",
    )
    assert [t.key for t in result.trials] == ["b64-linear", "b128-linear"]
    for trial in result.trials:
        assert trial.outcome == "complete" and trial.full_budget
        # every batch size evaluated at the same samples seen (1024 is divisible by both)
        assert [p.samples_seen for p in trial.curve] == [512, 1024, 1536, 2048]
        assert trial.steps_done == 2 * 1024 // trial.batch_size
        assert trial.learning_rate == pytest.approx(0.05 * trial.batch_size / 64)
    assert max(t.final_metric for t in result.trials) > CHANCE + 0.05  # it learned something

    assert result.front
    points = {t.key: (math.inf if front_time(t, True) is None else front_time(t, True), t.final_metric)
              for t in result.trials}
    for key in result.front:
        assert not any(_dominates(points[o], points[key]) for o in points if o != key)
    for key in set(points) - set(result.front):
        assert any(_dominates(points[o], points[key]) for o in points)

    record = RunRecord.load(tmp_path / "run.json")
    assert record.kind == "sweep" and len(record.sections["sweep"]["trials"]) == 2
    assert record.sections["sweep"]["front"] == result.front
    rows = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert [r["key"] for r in rows] == ["b64-linear", "b128-linear"]
    assert (tmp_path / "report.html").read_text().count("<svg") == 5

    # Running the finished study again trains nothing and reports the same trials.
    again = sweep(
        "small-cnn-cifar10", [64, 128], lr_rule="linear", epochs=2, target_metric=0.15,
        out_dir=tmp_path, pruning=False, workload_options=SMALL, device="cpu",
    )
    assert [t.train_seconds for t in again.trials] == [t.train_seconds for t in result.trials]
    assert len(_journal_trials(tmp_path / "optuna-journal.log", "small-cnn-cifar10-grid")) == 2


CLI = "import typer; from batchscope.cli.sweep_cmd import command; typer.run(command)"


def _sweep_process(out: Path) -> subprocess.Popen:
    args = [
        sys.executable, "-c", CLI, "-w", "small-cnn-cifar10", "-o", "train_size=1024",
        "-o", "test_size=128", "-b", "32,64", "--epochs", "1", "--evals-per-epoch", "4",
        "--no-pruning", "--out", str(out), "--study", "killed", "--device", "cpu", "--no-report",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)


def test_resume_after_kill_9_loses_nothing_and_runs_nothing_twice(tmp_path):
    process = _sweep_process(tmp_path)
    try:
        for line in process.stderr:  # progress lines: kill once the 2nd trial is under way
            if line.startswith("[b64-linear] epoch 0.25"):  # 12 of its 16 steps to go
                break
        else:
            pytest.fail(f"the sweep ended before its second trial (exit {process.wait()})")
        time.sleep(0.1)  # into training, away from the journal writes of the evaluation
        assert process.poll() is None, "the sweep finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    journal = tmp_path / "optuna-journal.log"
    killed = {books.trial_key(t): t.state for t in _journal_trials(journal, "killed")}
    assert killed == {"b32-linear": TrialState.COMPLETE, "b64-linear": TrialState.RUNNING}

    resumed = _sweep_process(tmp_path)
    log = resumed.stderr.read()
    assert resumed.wait() == 0, log
    assert "[b32-linear] epoch" not in log  # the finished point was not trained again

    trials = _journal_trials(journal, "killed")
    by_key: dict[str, list] = {}
    for trial in trials:
        by_key.setdefault(books.trial_key(trial), []).append((trial.state, books.outcome_of(trial)))
    assert by_key == {
        "b32-linear": [(TrialState.COMPLETE, "complete")],
        "b64-linear": [(TrialState.FAIL, "stale"), (TrialState.COMPLETE, "complete")],
    }
    section = json.loads((tmp_path / "run.json").read_text())["sections"]["sweep"]
    assert sorted(t["key"] for t in section["trials"]) == ["b32-linear", "b64-linear"]
    assert all(len(t["curve"]) == 4 for t in section["trials"])
