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

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
GPU_BENCHMARKS = ("memory", "throughput", "noise", "tune_vs_reference", "seed_experiment")


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
    for flag in ("--epochs", "--budget", "--out", "--device", "--cpu-smoke", "--tune-out"):
        assert flag in text


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
        "error: unknown step 'bogus'; choose from: memory throughput noise tune sweep seed")
    assert not out.exists()  # nothing ran, nothing written

