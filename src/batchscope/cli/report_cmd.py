"""`batchscope report RUN.json`: re-render a saved run's report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from batchscope.atomic import check_writable_directory
from batchscope.cli.common import JSON_HELP, console, print_json
from batchscope.errors import UsageError
from batchscope.record import RunRecord
from batchscope.report.html import PLOTS_DIR, REPORT_NAME
from batchscope.sweep.output import FIGURES_DIR

# Where each kind's writer puts its PNG/SVG plots, next to the HTML: both paths are checked
# before anything is drawn.
_PLOTS_DIR = {"tune": PLOTS_DIR, "adaptive": PLOTS_DIR, "sweep": FIGURES_DIR}

HTML_HELP = (f"Write the HTML report to this file instead of {REPORT_NAME} next to RUN.json; its "
             "plots (PNG/SVG) go in a folder beside it and the run's own directory is left as it "
             "was. The HTML is self-contained (plots inlined).")


def command(
    run: Path = typer.Argument(..., metavar="RUN.json", help="A run.json written by batchscope."),
    html: Optional[Path] = typer.Option(None, "--html", help=HTML_HELP),
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
    if record.kind not in _PLOTS_DIR:
        raise UsageError(f"run record kind {record.kind!r} has no report; reports exist for tune, "
                         "sweep and adaptive runs")
    predicted_batch = None
    if predicted is not None:
        from batchscope.sweep.output import resolve_predicted

        predicted_batch = resolve_predicted(predicted)
    html_path = _checked_html_path(run, html, _PLOTS_DIR[record.kind])
    path = _render(record, html_path, predicted_batch)
    if json_out:
        print_json({"kind": record.kind, "report": str(path), "errors": record.errors,
                    "sections": sorted(record.sections)})
    else:
        console.print(f"report: {path}", soft_wrap=True)  # a long path stays one line to copy


def _checked_html_path(run: Path, html: Path | None, plots_dir: str) -> Path:
    """The HTML file to write, refused up front (before seconds of drawing) when it or the plots
    folder beside it cannot be written."""
    if html is None:
        path, option, fix = run.parent / REPORT_NAME, "the report", "pass --html PATH elsewhere"
    else:
        path, option, fix = html, "--html", "pass a file path in a writable directory"
    if path.is_dir():
        where = ("pass --html PATH to write the report elsewhere" if html is None
                 else f"pass a file path such as {str(path / REPORT_NAME)!r}")
        raise UsageError(f"{option} {str(path)!r} is a directory; {where}")
    if path.resolve() == run.resolve():  # the HTML would replace the record it is drawn from
        raise UsageError(f"{option} {str(path)!r} is the run record itself; pass another file "
                         f"name such as {str(path.with_name(REPORT_NAME))!r}")
    for directory in (path.parent, path.parent / plots_dir):
        try:
            check_writable_directory(directory)
        except OSError as exc:
            raise UsageError(f"{option} {str(path)!r} cannot be written: directory "
                             f"{str(directory)!r} is not writable ({exc.strerror or exc}); "
                             f"{fix}") from None
    return path


def _render(record: RunRecord, html_path: Path, predicted_batch: int | None) -> Path:
    out_dir = html_path.parent  # the plots go next to the HTML that shows them
    if record.kind == "tune":
        from batchscope.report.tune_report import write_tune_report

        return write_tune_report(record, out_dir, html_path=html_path)
    if record.kind == "sweep":
        from batchscope.sweep.output import render_outputs
        from batchscope.sweep.results import SweepResult

        result = SweepResult.from_dict(record.sections["sweep"])
        if predicted_batch is not None:  # e.g. tune run after the sweep; the record stays as it was
            result.predicted_batch_size = predicted_batch
        return render_outputs(result, out_dir, html_path=html_path,
                              title=f"batchscope sweep — {record.workload.get('name', '')}")
    from batchscope.report.adaptive_report import write_adaptive_report

    return write_adaptive_report(record, out_dir, html_path=html_path)
