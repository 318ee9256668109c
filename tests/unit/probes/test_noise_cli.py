"""`batchscope probe noise` through a local Typer app (the lead registers the command in main)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from batchscope.cli.probe_noise import command
from batchscope.errors import UsageError
from batchscope.record import RunRecord

sys.path.insert(0, str(Path(__file__).parent))  # `test_noise_problems:entry_point` must import
from test_noise_problems import analytic_noise, linear_model  # noqa: E402

ENTRY = "test_noise_problems:entry_point"


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.command()(command)
    return app


def test_json_output_is_the_result_and_nothing_else(app, tmp_path):
    out = tmp_path / "run.json"
    args = ["--workload", ENTRY, "--device", "cpu", "--steps", "100", "--micro-batch-size", "4",
            "--accumulation", "8", "--confidence", "0.99", "--json", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    truth = analytic_noise(linear_model())["b_simple"]
    assert data["ci_low"] <= truth <= data["ci_high"]
    assert (data["micro_batch_size"], data["big_batch_size"], data["samples"]) == (4, 32, 100)
    record = RunRecord.load(out)
    assert record.kind == "probe-noise"
    assert record.sections["noise"]["b_simple"] == pytest.approx(data["b_simple"])
    assert record.workload["name"] == "linear-mean-sgd"


def test_human_output_shows_the_estimate_and_interval(app):
    result = CliRunner().invoke(app, ["-w", ENTRY, "--device", "cpu", "--steps", "8", "--accumulation", "2"])
    assert result.exit_code == 0, result.output
    assert "B_simple (examples)" in result.stdout and "90% interval" in result.stdout
    assert "8 / 16" in result.stdout  # default micro-batch: reference batch 16 / accumulation 2


def test_a_noise_scale_known_only_from_below_is_shown_as_at_least(app):
    # At the least-squares optimum B_noise is infinite: the table gives the interval's lower end.
    result = CliRunner().invoke(app, ["-w", "test_noise_problems:at_the_optimum_entry_point",
                                      "--device", "cpu", "--steps", "16", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "lower_bound" and data["ci_high"] is None
    result = CliRunner().invoke(app, ["-w", "test_noise_problems:at_the_optimum_entry_point",
                                      "--device", "cpu", "--steps", "16"])
    assert result.exit_code == 0, result.output
    assert f"[{data['ci_low']:.4g}, ∞): at least {data['ci_low']:.4g}" in result.stdout


def test_bad_values_raise_usage_errors(app):
    result = CliRunner().invoke(app, ["-w", ENTRY, "--device", "cpu", "--steps", "1"])
    assert isinstance(result.exception, UsageError) and "steps=1" in str(result.exception)
    result = CliRunner().invoke(app, ["-w", ENTRY, "--device", "cpu", "--method", "exact"])
    assert isinstance(result.exception, UsageError) and "method='exact'" in str(result.exception)


def test_out_is_checked_before_measuring_and_may_be_a_directory(app, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr("batchscope.cli.probe_noise.estimate_noise_scale",
                        lambda *a, **k: pytest.fail("measured before checking --out"))
    result = CliRunner().invoke(app, ["-w", ENTRY, "--device", "cpu", "--out",
                                      str(blocker / "noise.json")])
    assert isinstance(result.exception, UsageError) and "is not writable" in str(result.exception)
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["-w", ENTRY, "--device", "cpu", "--steps", "8",
                                      "--accumulation", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert RunRecord.load(tmp_path / "noise.json").kind == "probe-noise"
