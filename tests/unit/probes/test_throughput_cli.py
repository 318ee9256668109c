"""`batchscope probe throughput`: parsing, JSON on stdout, run record, usage errors."""

from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

import pytest
from batchscope.cli import probe_throughput
from batchscope.cli.main import run
from batchscope.errors import UsageError
from batchscope.record import RunRecord

WORKLOAD_MODULE = textwrap.dedent(
    """
    import time

    import torch
    from torch import nn

    from batchscope.workload import Workload


    def make_batch(batch_size, device, generator):
        return torch.randn(batch_size, 4, generator=generator), torch.randn(batch_size, 1,
                                                                            generator=generator)


    def loss(model, batch):
        time.sleep(0.001)
        return nn.functional.mse_loss(model(batch[0]), batch[1])


    def workload():
        return Workload(
            name="tiny-cli",
            build_model=lambda device: nn.Linear(4, 1).to(device),
            build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
            loss=loss,
            make_batch=make_batch,
            reference_batch_size=8,
            reference_lr=0.01,
        )
    """
)

FAST = ["--warmup-steps", "1", "--timed-steps", "3", "--device", "cpu"]


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """`batchscope probe throughput --workload tiny_cli_workload:workload ...` through the real
    entry point (so errors are formatted where every command's are): exit code and output."""
    (tmp_path / "tiny_cli_workload.py").write_text(WORKLOAD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))

    def invoke(*args: str, workload: str = "tiny_cli_workload:workload"):
        capsys.readouterr()  # drop anything printed before
        with pytest.raises(SystemExit) as excinfo:
            run(["probe", "throughput", "--workload", workload, *FAST, *args])
        output = capsys.readouterr()
        return SimpleNamespace(exit_code=excinfo.value.code, stdout=output.out,
                               stderr=output.err)

    return invoke


def test_json_goes_to_stdout_alone(cli):
    result = cli("--batch-sizes", "16,8", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [point["batch_size"] for point in data["points"]] == [8, 16]
    assert data["device"] == "cpu"
    assert data["max_batch_size_source"] == "batch_sizes"
    assert data["input_pipeline"]["measured"] is False


def test_out_writes_a_run_record(cli, tmp_path):
    out = tmp_path / "runs" / "throughput.json"
    result = cli("--max-batch-size", "16", "--no-early-stop", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    record = RunRecord.load(out)
    assert record.kind == "probe-throughput"
    assert record.workload["name"] == "tiny-cli"
    section = record.sections["throughput"]
    assert [point["batch_size"] for point in section["points"]] == [8, 16]
    assert section["knee_batch_size"] in (8, 16)
    assert "run record written to" in result.stdout


def test_human_output_shows_the_table_and_the_knee(cli):
    result = cli("--batch-sizes", "8,16")
    assert result.exit_code == 0, result.stderr
    assert "Throughput on cpu" in result.stdout
    assert "samples/s" in result.stdout
    assert "knee: batch" in result.stdout
    assert "input pipeline: not measured" in result.stdout


@pytest.mark.parametrize(("args", "fragment"), [
    (["--batch-sizes", "8,x"], "--batch-sizes '8,x' is not a comma-separated list"),
    (["--batch-sizes", "8", "--fraction", "2"], "fraction=2.0"),
    (["--max-batch-size", "0"], "max_batch_size=0"),
])
def test_usage_errors_are_one_line_and_exit_code_2(cli, args, fragment):
    result = cli(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert result.stderr.count("\n") == 1


def test_unknown_entry_point_is_a_usage_error(cli):
    result = cli(workload="no_such_module_xyz:workload")
    assert result.exit_code == 2
    assert "no_such_module_xyz" in result.stderr


@pytest.mark.parametrize(("text", "sizes"), [("32,64,128", [32, 64, 128]), (" 8, 16 ,", [8, 16])])
def test_parse_batch_sizes(text, sizes):
    assert probe_throughput.parse_batch_sizes(text) == sizes


@pytest.mark.parametrize("text", ["", "0", "8,-16", "1.5", "eight"])
def test_parse_batch_sizes_rejects(text):
    with pytest.raises(UsageError, match="--batch-sizes"):
        probe_throughput.parse_batch_sizes(text)


def test_out_may_be_an_existing_directory(cli, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    result = cli("--batch-sizes", "8", "--out", str(runs))
    assert result.exit_code == 0, result.stderr
    assert RunRecord.load(runs / "throughput.json").kind == "probe-throughput"


def test_an_unwritable_out_fails_before_measuring(cli, tmp_path, monkeypatch):
    # A parent that is a file cannot hold the record (a permission bit would not stop root).
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setattr(probe_throughput, "measure_throughput",
                        lambda *a, **k: pytest.fail("measured before checking --out"))
    result = cli("--batch-sizes", "8", "--out", str(blocker / "throughput.json"))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --out '{blocker / 'throughput.json'}' is not "
                                    f"writable")
    assert result.stderr.count("\n") == 1 and result.stdout == ""
