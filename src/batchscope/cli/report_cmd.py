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
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Re-render the HTML report and plots of a saved run."""
    record = RunRecord.load(run)
    out_dir = run.parent
    if record.kind == "tune":
        from batchscope.report.tune_report import write_tune_report

        path = write_tune_report(record, out_dir, html_path=html)
    elif record.kind == "sweep":
        from batchscope.sweep.output import render_outputs
        from batchscope.sweep.results import SweepResult

        result = SweepResult.from_dict(record.sections["sweep"])
        path = render_outputs(result, out_dir, title=f"batchscope sweep — {record.workload.get('name', '')}",
                              html_path=html)
    else:
        raise UsageError(f"run record kind {record.kind!r} has no report; reports exist for tune and sweep runs")
    if json_out:
        print_json({"kind": record.kind, "report": str(path), "errors": record.errors,
                    "sections": sorted(record.sections)})
    else:
        console.print(f"report: {path}")
