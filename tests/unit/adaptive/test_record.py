"""An adaptive run's record and report: what it saves is what happened (every decision, every
change), the report draws both plots from the record alone, and `batchscope report` redraws it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from batchscope.adaptive import save_adaptive_run
from batchscope.cli.main import run
from batchscope.record import RunRecord

sys.path.insert(0, str(Path(__file__).parent))
from test_controller import make, run_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "probes"))
from test_noise_problems import N_EXAMPLES, linear_data, linear_model  # noqa: E402


def _trained(tmp_path):
    x, y = linear_data()
    model = linear_model()
    adaptive, optimizer = make(model, batch_size=8, measure_every=1, decide_every=4, min_samples=2)
    sampler = adaptive.batch_sampler(N_EXAMPLES, seed=0)
    for _ in range(5):
        for indices in sampler:
            run_step(adaptive, model, (x[indices], y[indices]))
            optimizer.step()
            optimizer.zero_grad()
    return adaptive


def test_the_record_holds_every_decision_and_change_and_the_report_both_plots(tmp_path):
    adaptive = _trained(tmp_path)
    report = save_adaptive_run(adaptive, tmp_path, device=torch.device("cpu"))
    record = RunRecord.load(tmp_path / "run.json")
    assert record.kind == "adaptive"
    history, changes = record.sections["history"], record.sections["changes"]
    assert [h["step"] for h in history] == list(range(4, adaptive.steps + 1, 4))
    assert [c["batch_size"] for c in changes] == [16, 32, 64, 128] == [c["batch_size"] for c in adaptive.changes]
    assert [h["batch_size"] for h in history][:4] == [16, 32, 64, 128]
    assert all(h["noise_scale"] > 0 and h["optimum"] == 128 for h in history)
    summary = record.sections["summary"]
    assert (summary["start_batch_size"], summary["final_batch_size"]) == (8, 128)
    assert summary["examples_seen"] == 5 * N_EXAMPLES and summary["steps"] == adaptive.steps
    html = report.read_text()
    assert html.count("<figure") == 2 and "Batch changes" in html
    assert "Started at batch 8 and ended at 128" in html
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "batch-size-over-training.png", "gradient-noise-scale-over-training.png"]

    again = tmp_path / "again.html"
    with pytest.raises(SystemExit) as exited:
        run(["report", str(tmp_path / "run.json"), "--html", str(again)])
    assert exited.value.code == 0
    assert again.read_text().count("<figure") == 2


def test_an_unwritable_directory_is_a_one_line_usage_error(tmp_path):
    from batchscope.errors import UsageError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="is not writable"):
        save_adaptive_run(_trained(tmp_path), blocker / "out")
