"""`batchscope report RUN.json`: re-render a saved run's report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from batchscope.cli.common import JSON_HELP, console, print_json
from batchscope.errors import UsageError
from batchscope.record import RunRecord


def command(
    run: Path = typer.Argument(..., help="A run.json written by batchscope."),
    html: Optional[Path] = typer.Option(None, "--html", help="Where to write the HTML (default: next to RUN.json)."),
    predicted: Optional[str] = typer.Option(
        None, "--predicted",
        help="Sweep runs: mark this batch (an integer or a tune run.json) as tune's prediction."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Re-render the HTML report and plots of a saved run."""
    record = RunRecord.load(run)
    if predicted is not None and record.kind != "sweep":
        raise UsageError(f"--predicted marks tune's batch on a sweep's plots; {str(run)!r} is a "
                         f"{record.kind!r} run")
    out_dir = run.parent
    if record.kind == "tune":
        from batchscope.report.tune_report import write_tune_report

        path = write_tune_report(record, out_dir, html_path=html)
    elif record.kind == "sweep":
        from batchscope.sweep.output import render_outputs, resolve_predicted
        from batchscope.sweep.results import SweepResult

        result = SweepResult.from_dict(record.sections["sweep"])
        if predicted is not None:  # e.g. tune run after the sweep; the record stays as it was
            result.predicted_batch_size = resolve_predicted(predicted)
        path = render_outputs(result, out_dir, title=f"batchscope sweep — {record.workload.get('name', '')}",
                              html_path=html)
    elif record.kind == "adaptive":
        from batchscope.report.adaptive_report import write_adaptive_report

        path = write_adaptive_report(record, out_dir, html_path=html)
    else:
        raise UsageError(f"run record kind {record.kind!r} has no report; reports exist for tune, "
                         "sweep and adaptive runs")
    if json_out:
        print_json({"kind": record.kind, "report": str(path), "errors": record.errors,
                    "sections": sorted(record.sections)})
    else:
        console.print(f"report: {path}")
