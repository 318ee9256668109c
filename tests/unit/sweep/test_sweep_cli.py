import json

import pytest
import typer
from typer.testing import CliRunner

from batchscope.cli import sweep_cmd
from batchscope.errors import UsageError

ENTRY = "sweep_fixtures:tiny_workload"


@pytest.fixture
def app(tiny):  # `tiny` puts sweep_fixtures on sys.path for the entry point
    app = typer.Typer()
    app.command("sweep")(sweep_cmd.command)
    app.command("other")(lambda: None)  # two commands: `sweep` stays a sub-command
    return app


def test_json_lists_every_finished_trial_and_the_front(app, tmp_path):
    result = CliRunner().invoke(app, [
        "sweep", "-w", ENTRY, "--batch-sizes", "16,32", "--lr-rule", "all", "--epochs", "1",
        "--target-metric", "0.6", "--out", str(tmp_path), "--no-pruning", "--json",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    keys = sorted(t["key"] for t in data["trials"])
    # 16 is the reference batch: every rule gives the reference LR there, so it trains once.
    assert keys == sorted(["b16-linear"] + [f"b32-{r}" for r in ("linear", "sqrt", "none")])
    assert any("b16-linear also stands for b16-sqrt, b16-none" in n for n in data["notes"])
    assert data["front"] and set(data["front"]) <= set(keys)
    assert all(t["outcome"] == "complete" and len(t["curve"]) == 2 for t in data["trials"])
    assert "[b16-linear] epoch 0.5" in result.stderr
    assert (tmp_path / "trials.csv").exists() and (tmp_path / "report.html").exists()


def test_micro_batch_size_accumulates_the_batches_above_it(app, tmp_path):
    result = CliRunner().invoke(app, [
        "sweep", "-w", ENTRY, "-b", "16,64", "--epochs", "1", "--micro-batch-size", "16",
        "--out", str(tmp_path), "--no-report", "--json",
    ])
    assert result.exit_code == 0, result.output
    extras = {t["key"]: t["extra"] for t in json.loads(result.stdout)["trials"]}
    assert "micro_batch_size" not in extras["b16-linear"]
    assert (extras["b64-linear"]["micro_batch_size"], extras["b64-linear"]["accumulation"]) == (16, 4)


def test_human_output_shows_the_table_and_the_files(app, tmp_path):
    result = CliRunner().invoke(app, [
        "sweep", "-w", ENTRY, "-b", "16,32", "--out", str(tmp_path), "--predicted", "32",
    ])
    assert result.exit_code == 0, result.output
    assert "Pareto front:" in result.stdout and "b32-linear" in result.stdout
    assert f"html: {tmp_path / 'report.html'}" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-b", "16,abc"], "is not an integer"),
        (["-b", "16,32", "--lr-rule", "cubic"], "lr_rule='cubic'"),
        (["-b", "16,32", "--mode", "search"],
         "n_trials=None must be a positive integer (search mode needs --n-trials, e.g. 20)"),
        (["-b", "16,32", "--n-trials", "3"], "applies to --mode search only"),
        (["-b", "16,512"], "exceeds the 256 training examples"),
        (["-b", "16", "--backend", "slurm"], "backend='slurm'"),
    ],
)
def test_bad_input_is_a_one_line_usage_error(app, tmp_path, args, message):
    result = CliRunner().invoke(app, ["sweep", "-w", ENTRY, "--out", str(tmp_path), *args])
    assert isinstance(result.exception, UsageError)
    assert message in str(result.exception) and "\n" not in str(result.exception)
