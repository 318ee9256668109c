"""The benchmark scripts' entry points: --help works, and without a GPU (and without --cpu-smoke)
each GPU benchmark stops at once with exit code 2 and a one-line message.

The scripts are loaded in this process (a subprocess per script would pay torch's import each
time) and CUDA is hidden with monkeypatch, so the same answers hold on a GPU machine. Their
--cpu-smoke modes train real models for a minute or more and are not run here.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import batchscope

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
GPU_BENCHMARKS = ("memory", "throughput", "noise", "tune_vs_reference", "seed_experiment",
                  "adaptive_vs_fixed", "adaptive_overhead")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body runs.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.parametrize("name", GPU_BENCHMARKS)
def test_help_exits_zero_and_names_the_cpu_smoke_flag(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _load(name)
    with pytest.raises(SystemExit) as stopped:
        module.main(["--help"])
    assert stopped.value.code == 0
    assert "--cpu-smoke" in capsys.readouterr().out


@pytest.mark.parametrize("name", GPU_BENCHMARKS)
def test_without_cuda_exits_2_with_one_line(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _load(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert module.main([]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "CUDA" in lines[0] and "--cpu-smoke" in lines[0]
    assert captured.out == ""


def test_tune_vs_reference_help_lists_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _load("tune_vs_reference").main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--epochs", "--budget", "--out", "--device", "--cpu-smoke", "--tune-out",
                 "--also-lr-rule"):
        assert flag in text


def test_bad_arguments_stop_before_any_tuning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A typo must not cost a tune budget first: both scripts refuse it while parsing.
    tvr = _load("tune_vs_reference")
    monkeypatch.setattr(tvr, "run_tune", lambda *a, **k: pytest.fail("tuned"))
    with pytest.raises(SystemExit) as stopped:
        tvr.main(["--cpu-smoke", "--also-lr-rule", "cubic"])
    assert stopped.value.code == 2 and "--also-lr-rule 'cubic'" in capsys.readouterr().err

    seed = _load("seed_experiment")
    monkeypatch.setattr(seed.tvr, "run_tune", lambda *a, **k: pytest.fail("tuned"))
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "optuna-journal.log").write_text("{}")
    for args, message in (
        (["--lr-rules", "linear,cubic"], "lr_rule='cubic'"),
        (["--epochs", "0"], "--epochs 0 must be a positive integer"),
        (["--batch-sizes", "32,128"], "must include the reference batch 64"),
        (["--work", str(tmp_path)], "already holds a sweep"),
    ):
        with pytest.raises((SystemExit, batchscope.UsageError)) as stopped:
            seed.main(["--cpu-smoke", "--work", str(tmp_path / "fresh"), *args])
        text = capsys.readouterr().err + str(stopped.value)
        assert message in text, (args, text)


def _trial(key: str, batch: int, lr: float, warmup: int, to_target: float | None,
           full: bool = True) -> Any:
    from batchscope.sweep.trial_record import TrialRecord

    return TrialRecord(key=key, batch_size=batch, lr_rule=key.split("-")[1],
                       learning_rate=lr, warmup_steps=warmup, steps_per_epoch=1, total_steps=1,
                       seed=0, time_to_target=to_target, full_budget=full)


def test_seed_experiment_picks_the_reference_the_matching_run_and_the_best_range() -> None:
    from batchscope.recommend import Recommendation
    from batchscope.sweep.results import SweepResult
    from batchscope.workloads import get_workload

    seed = _load("seed_experiment")
    trials = [
        _trial("b128-linear", 128, 0.1, 0, 115.0),
        _trial("b512-linear", 512, 0.4, 485, 31.4),
        _trial("b512-sqrt", 512, 0.2, 0, None),
        _trial("b1024-sqrt", 1024, 0.2828, 240, 23.7),
        _trial("b2048-sqrt", 2048, 0.4, 120, 25.0, full=False),  # pruned: not a candidate
    ]
    # (build() re-scores time to target against its target: these trials keep their own.)
    result = SweepResult(trials=trials, front=[], higher_is_better=True, target_metric=None,
                         metric_name="accuracy")
    workload = get_workload("resnet18-cifar10")
    assert seed._reference_trial(result, workload).key == "b128-linear"

    def recommendation(batch: int, lr: float, warmup: int, accumulation: int = 1) -> Any:
        return Recommendation(batch_size=batch, per_device_batch_size=batch // accumulation,
                              grad_accumulation=accumulation, learning_rate=lr,
                              lr_rule="linear", warmup_steps=warmup,
                              predicted_speedup_vs_reference=None, base_batch_size=128,
                              base_learning_rate=0.1)

    assert seed._matching_trial(result, recommendation(512, 0.4, 485)).key == "b512-linear"
    assert seed._matching_trial(result, recommendation(512, 0.4, 0)) is None  # other warmup
    assert seed._matching_trial(result, recommendation(512, 0.4, 485, accumulation=2)) is None
    # 23.7 s is the fastest; 10% above it is 26.07 s: b512-linear (31.4 s) is outside.
    assert [t.key for t in seed._best_range(trials)] == ["b1024-sqrt"]
    trials[1].time_to_target = 26.0
    assert [t.key for t in seed._best_range([*trials, trials[1]])] == [
        "b1024-sqrt", "b512-linear"]  # the recommended run, also a sweep trial, counted once


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@needs_bash
@pytest.mark.parametrize("script", ("gpu_check.sh", "fetch_device_wheels.sh"))
def test_shell_scripts_parse_and_print_help(script: str) -> None:
    path = BENCHMARKS / script
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    shown = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert script in shown.stdout  # the usage line names the script


@needs_bash
def test_gpu_check_rejects_an_unknown_step_before_running_anything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "memory", "bogus"],
                            capture_output=True, text=True, timeout=30,
                            env={"OUT": str(out), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown step 'bogus'; choose from: memory throughput noise tune sweep seed adaptive "
        "overhead")
    assert not out.exists()  # nothing ran, nothing written

