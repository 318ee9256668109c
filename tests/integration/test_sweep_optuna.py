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

# The sweep under test, as an entry point module the test writes: the small CNN whose loss, at
# the 6th training step of the b64 trial (between its evaluations after steps 4 and 8), says so
# in REACHED and then waits while BLOCK exists. Killed there, the process is certainly
# mid-trial; without BLOCK (the resumed run) it trains straight through.
BLOCKING_WORKLOAD = """
import time
from pathlib import Path

from batchscope.workloads import get_workload

REACHED = Path({reached!r})
BLOCK = Path({block!r})
BLOCK_AT_CALL = 7  # the b64 trial's burn-in step, then its training steps 1..6


def workload():
    base = get_workload("small-cnn-cifar10", train_size=1024, test_size=128)
    calls = {{"b64": 0}}

    def loss(model, batch):
        if batch[1].shape[0] == 64:
            calls["b64"] += 1
            if calls["b64"] == BLOCK_AT_CALL and BLOCK.exists():
                REACHED.touch()
                deadline = time.monotonic() + 300  # never outlive a test that died
                while BLOCK.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
        return base.loss(model, batch)

    return base.with_settings(loss=loss)
"""


def _sweep_process(out: Path, log: Path) -> subprocess.Popen:
    args = [
        sys.executable, "-c", CLI, "-w", "blocking_sweep:workload", "-b", "32,64", "--epochs", "1",
        "--evals-per-epoch", "4", "--no-pruning", "--out", str(out / "sweep"), "--study", "killed",
        "--device", "cpu", "--no-report",
    ]
    path = os.pathsep.join(p for p in (str(out), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    # stderr to a file: a pipe nobody reads while the test waits could fill and block the sweep
    return subprocess.Popen(args, stderr=log.open("w"), stdout=subprocess.DEVNULL, env=env)


def _wait_for(marker: Path, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 240
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the sweep ended (exit {process.returncode}) before blocking:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail("the sweep never reached the blocking step")
        time.sleep(0.02)


def test_resume_after_kill_9_loses_nothing_and_runs_nothing_twice(tmp_path):
    reached, block = tmp_path / "reached", tmp_path / "block"
    (tmp_path / "blocking_sweep.py").write_text(
        BLOCKING_WORKLOAD.format(reached=str(reached), block=str(block))
    )
    block.touch()
    first_log = tmp_path / "first.log"
    process = _sweep_process(tmp_path, first_log)
    try:
        _wait_for(reached, process, first_log)  # now blocked inside the b64 trial's 6th step
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    journal = tmp_path / "sweep" / "optuna-journal.log"
    killed = {books.trial_key(t): t.state for t in _journal_trials(journal, "killed")}
    assert killed == {"b32-linear": TrialState.COMPLETE, "b64-linear": TrialState.RUNNING}
    assert "[b64-linear] epoch 0.25" in first_log.read_text()
    assert "[b64-linear] epoch 0.5" not in first_log.read_text()

    block.unlink()
    resumed_log = tmp_path / "resumed.log"
    resumed = _sweep_process(tmp_path, resumed_log)
    assert resumed.wait(timeout=240) == 0, resumed_log.read_text()[-2000:]
    log = resumed_log.read_text()
    assert "[b32-linear] epoch" not in log  # the finished point was not trained again
    assert "[b64-linear] epoch 1" in log

    trials = _journal_trials(journal, "killed")
    by_key: dict[str, list] = {}
    for trial in trials:
        by_key.setdefault(books.trial_key(trial), []).append((trial.state, books.outcome_of(trial)))
    assert by_key == {
        "b32-linear": [(TrialState.COMPLETE, "complete")],
        "b64-linear": [(TrialState.FAIL, "stale"), (TrialState.COMPLETE, "complete")],
    }
    section = json.loads((tmp_path / "sweep" / "run.json").read_text())["sections"]["sweep"]
    assert sorted(t["key"] for t in section["trials"]) == ["b32-linear", "b64-linear"]
    assert all(len(t["curve"]) == 4 for t in section["trials"])
