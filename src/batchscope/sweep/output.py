"""Write a sweep's files: the run record (JSON), the trials (CSV), the figures, the HTML report.

Everything is rendered from the SweepResult, which is itself stored in the record's `sweep`
section, so `render_outputs(SweepResult.from_dict(record.sections["sweep"]), ...)` redraws a
past sweep exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from batchscope.checks import require_int
from batchscope.record import RunRecord
from batchscope.report.html import REPORT_NAME
from batchscope.sweep.results import SweepResult, write_trials_csv

RECORD_NAME = "run.json"
CSV_NAME = "trials.csv"
HTML_NAME = REPORT_NAME  # every kind of run names its HTML the same
FIGURES_DIR = "figures"


def write_outputs(
    result: SweepResult,
    out_dir: str | os.PathLike[str],
    *,
    workload: dict[str, Any],
    environment: dict[str, Any],
    report: bool = True,
) -> dict[str, str]:
    """Write every file (`report=False`: only the record and the CSV); returns name -> path
    (also stored in `result.paths`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"record": str(out / RECORD_NAME), "csv": str(out / CSV_NAME)}
    if report:
        paths.update(html=str(out / HTML_NAME), figures=str(out / FIGURES_DIR))
    result.paths = paths
    write_trials_csv(paths["csv"], result)
    if report:
        render_outputs(result, out, title=f"batchscope sweep: {workload.get('name', '')}")
    record = RunRecord(
        kind="sweep", workload=workload, environment=environment, sections={"sweep": result.to_dict()}
    )
    record.save(paths["record"])
    return paths


def render_outputs(result: SweepResult, out_dir: Path, *, title: str,
                   html_path: Path | None = None) -> Path:
    """Figures (PNG + SVG) and the self-contained HTML report."""
    # matplotlib costs a second to import: only pay for it when drawing.
    from batchscope.report.html import save_figures, write_html_report
    from batchscope.sweep.plots import sweep_figures

    figures = sweep_figures(result)
    path = write_html_report(
        html_path or out_dir / HTML_NAME,
        title,
        save_figures(out_dir / FIGURES_DIR, figures),
        tables=[("Trials", result.table()), ("Pareto front", _front_rows(result))],
        notes=report_notes(result),
        subtitle=_subtitle(result),
    )
    for _, figure in figures:
        figure.clear()
    return path


def report_notes(result: SweepResult) -> list[str]:
    notes = list(result.notes)
    best = result.best()
    if best is not None:
        what = "reached the target first" if result.target_metric is not None else "finished first"
        notes.append(
            f"Fastest trial on the front: batch {best.batch_size} ({best.lr_rule}, lr "
            f"{best.learning_rate:.3g}) {what}, final {result.metric_name} {best.final_metric:.4g}."
        )
    if result.predicted_batch_size is not None:
        notes.append(f"The batch size tune predicted ({result.predicted_batch_size}) is marked on every plot.")
    unfinished = [t for t in result.trials if not t.full_budget]
    if unfinished:
        notes.append(
            f"{len(unfinished)} trial(s) did not run their full budget (pruned, diverged or out "
            f"of memory) and are left off the front."
        )
    return notes


def _front_rows(result: SweepResult) -> list[dict[str, Any]]:
    return [
        {
            "key": t.key,
            "batch_size": t.batch_size,
            "lr_rule": t.lr_rule,
            "learning_rate": t.learning_rate,
            "final_metric": t.final_metric,
            "time_to_target": t.time_to_target,
            "train_seconds": t.train_seconds,
        }
        for t in result.front_trials()
    ]


def _subtitle(result: SweepResult) -> str:
    config = result.config
    parts = [
        f"{len(result.trials)} trials",
        f"{config.get('epochs')} epoch(s) each",
        f"backend {config.get('backend')}",
        f"metric {result.metric_name} ({'higher' if result.higher_is_better else 'lower'} is better)",
    ]
    if result.target_metric is not None:
        parts.append(f"target {result.target_metric:g}")
    return " · ".join(parts)


def resolve_predicted(value: int | str | os.PathLike[str] | None) -> int | None:
    """The batch `tune` predicted, from an int, a numeric string or a tune run.json path."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return require_int("predicted_batch_size", value, hint="the batch tune recommended")
    return predicted_from_record(value)


def predicted_from_record(path: str | os.PathLike[str]) -> int:
    """The batch size a saved `tune` run recommended (its `recommendation` section)."""
    record = RunRecord.load(path)
    recommendation = record.sections.get("recommendation") or {}
    size = recommendation.get("batch_size") if isinstance(recommendation, dict) else None
    return require_int("recommendation.batch_size", size, hint=(
        f"in run record {str(path)!r} of kind {record.kind!r}; pass the record of a "
        f"`batchscope tune` run or an integer"))
