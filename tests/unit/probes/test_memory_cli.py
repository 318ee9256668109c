"""`batchscope probe memory` through a local Typer app (the lead registers it in cli/main)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import typer
from torch import nn
from typer.testing import CliRunner

from batchscope.cli import probe_memory as cli
from batchscope.errors import UsageError
from batchscope.record import RunRecord
from batchscope.workload import Workload

SPEC = f"{__name__}:tiny_workload"


def tiny_workload() -> Workload:
    def make_batch(batch_size: int, device: torch.device, generator: torch.Generator) -> Any:
        x = torch.randn(batch_size, 3, 8, 8, generator=generator)
        return x.to(device), torch.randint(0, 4, (batch_size,), generator=generator).to(device)

    return Workload(
        name="tiny-cli",
        build_model=lambda device: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(),
                                                 nn.Linear(8 * 8 * 8, 4)).to(device),
        build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        make_batch=make_batch, reference_batch_size=16, reference_lr=0.01,
    )


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    application = typer.Typer()
    application.command()(cli.command)
    return application


pytestmark = pytest.mark.usefixtures("frozen_import_objects")


def test_json_output_and_run_record(app: typer.Typer, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "run.json"
    result = CliRunner().invoke(app, ["--workload", SPEC, "--device", "cpu",
                                      "--memory-budget", "256MiB", "--max-batch-size", "64",
                                      "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["max_batch_size"] == 64 and data["capped_by"] == "user max_batch_size"
    # 64 is the user's bound, far from the 256 MiB edge: no margin to take off it.
    assert data["recommended_batch_size"] == 64
    assert [p["batch_size"] for p in data["probes"]] == [8, 64]
    assert data["budget_bytes"] == 256 * 2**20
    record = RunRecord.load(out)
    assert record.kind == "probe-memory"
    assert record.sections["memory"]["max_batch_size"] == 64
    assert record.workload["name"] == "tiny-cli"


def test_human_output(app: typer.Typer) -> None:
    result = CliRunner().invoke(app, ["-w", SPEC, "--device", "cpu", "--memory-budget", "256MiB",
                                      "--max-batch-size", "16", "--margin", "0.5"])
    assert result.exit_code == 0, result.output
    assert "Memory probes on cpu (budget 256.00 MiB)" in result.stdout
    assert "largest verified batch: 16" in result.stdout
    assert "recommended batch:      16" in result.stdout
    assert "user max_batch_size" in result.stdout and "the bound itself" in result.stdout


@pytest.mark.parametrize(
    ("args", "match"),
    [(["--memory-budget", "lots"], "not a size"), ([], "--memory-budget"),
     (["--memory-budget", "1GiB", "--margin", "1.5"], "margin")],
)
def test_usage_errors(app: typer.Typer, args: list[str], match: str) -> None:
    result = CliRunner().invoke(app, ["-w", SPEC, "--device", "cpu", *args])
    assert isinstance(result.exception, UsageError)
    assert match in str(result.exception)


def test_out_is_checked_before_probing_and_may_be_a_directory(app, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(cli, "probe_memory",
                        lambda *a, **k: pytest.fail("probed before checking --out"))
    result = CliRunner().invoke(app, ["-w", SPEC, "--device", "cpu", "--memory-budget", "256MiB",
                                      "--out", str(blocker / "memory.json")])
    assert isinstance(result.exception, UsageError) and "is not writable" in str(result.exception)
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["-w", SPEC, "--device", "cpu", "--memory-budget", "256MiB",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert RunRecord.load(tmp_path / "memory.json").kind == "probe-memory"


def test_a_cpu_budget_above_the_machines_ram_is_refused_before_probing(app, monkeypatch):
    from batchscope import device as devices
    from batchscope.probes import memory

    monkeypatch.setattr(devices, "total_memory_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(memory, "InProcessRunner",
                        lambda *a, **k: pytest.fail("probing under a budget larger than the RAM"))
    result = CliRunner().invoke(app, ["-w", SPEC, "--device", "cpu", "--memory-budget", "1TiB"])
    assert isinstance(result.exception, UsageError)
    assert str(result.exception) == (
        "memory budget 1.00 TiB is more than this machine's RAM (8.00 GiB); pass --memory-budget "
        "/ memory_budget= of at most 8.00 GiB, less what else runs on it")


def test_the_fits_column_shows_words_not_markup_and_reasons_verbatim(capsys):
    from batchscope.probes.memory import MemoryProbeResult
    from batchscope.probes.memory_runner import MemoryProbe

    probes = (MemoryProbe(8, True, 2**20, 0.1, 2, "fits"),
              MemoryProbe(16, False, None, 0.1, 1, "out of memory [enforce fail]"))
    cli.render(MemoryProbeResult(
        max_batch_size=8, recommended_batch_size=8, smallest_failure=16, fixed_bytes=None,
        bytes_per_sample=None, probes=probes, seconds=0.2, budget_bytes=2**30, device="cpu",
        margin=0.1, tolerance=0.02, capped_by=None, stop_reason="converged", note="done"))
    out = capsys.readouterr().out
    assert "[green]" not in out and "[red]" not in out and "\\[" not in out
    cells = [line.split("│")[1:-1] for line in out.splitlines() if line.startswith("│")]
    assert [(row[1].strip(), row[2].strip()) for row in cells] == [("8", "yes"), ("16", "no")]
    assert cells[1][5].strip() == "out of memory [enforce fail]"
