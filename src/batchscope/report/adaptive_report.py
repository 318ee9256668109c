"""The report of an adaptive run: the batch and the noise scale over training, and each change
with its reason, drawn from the run record alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from batchscope.record import RunRecord
from batchscope.report.axes import batch_size_label
from batchscope.report.html import PLOTS_DIR, REPORT_NAME, save_figures, write_html_report

_CHANGE_STYLE = {"color": "#d62728", "zorder": 3}


def write_adaptive_report(record: RunRecord, out_dir: str | Path,
                          html_path: str | Path | None = None) -> Path:
    """Render `record` into `out_dir` (plots) and `html_path` (default `out_dir/report.html`)."""
    out = Path(out_dir)
    sections = record.sections
    figures = [(title, figure) for title, figure in (
        ("Batch size over training", batch_figure(sections)),
        ("Gradient noise scale over training", noise_figure(sections)),
    ) if figure is not None]
    settings = sections.get("settings", {})
    return write_html_report(
        html_path or out / REPORT_NAME,
        title=f"batchscope adaptive run — {record.workload.get('name', 'workload')}",
        subtitle=f"{record.environment.get('device_name') or record.environment.get('device', '')} · "
                 f"{record.created_at}",
        figures=save_figures(out / PLOTS_DIR, figures),
        tables=[("Batch changes", _change_rows(sections.get("changes", []))),
                ("Settings", [{"setting": key, "value": value} for key, value in settings.items()
                              if key not in ("candidates", "schedule")])],
        notes=_notes(sections, record.errors),
    )


def batch_figure(sections: Mapping[str, Any]) -> Figure | None:
    """The global batch against examples seen (a step line), with each change marked."""
    summary = sections.get("summary")
    if not summary:
        return None
    changes = sections.get("changes", [])
    xs, ys = [0], [summary["start_batch_size"]]
    for change in changes:
        xs += [change["examples_seen"], change["examples_seen"]]
        ys += [change["previous"], change["batch_size"]]
    xs.append(max(summary["examples_seen"], xs[-1]))
    ys.append(summary["final_batch_size"])
    figure = Figure(figsize=(6.4, 4.0))
    ax = figure.add_subplot()
    ax.plot(xs, ys, color="#1f77b4", label="batch size in use")
    if changes:
        ax.scatter([c["examples_seen"] for c in changes], [c["batch_size"] for c in changes],
                   label="change", **_CHANGE_STYLE)
    _batch_y_axis(ax, ys)
    ax.set_xlabel("examples seen")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure


def noise_figure(sections: Mapping[str, Any]) -> Figure | None:
    """The smoothed noise scale at each decision, and the plan's optimum batch it implied."""
    history = [h for h in sections.get("history", []) if h.get("noise_scale")]
    if not history:
        return None
    figure = Figure(figsize=(6.4, 4.0))
    ax = figure.add_subplot()
    xs = [h["examples_seen"] for h in history]
    ax.plot(xs, [h["noise_scale"] for h in history], color="#2ca02c", marker="o", markersize=3,
            label="noise scale B_simple (smoothed)")
    optimum = [(h["examples_seen"], h["optimum"]) for h in history if h.get("optimum")]
    if optimum:
        ax.plot(*zip(*optimum), color="#ff7f0e", linestyle="--", label="goodput optimum batch")
    _batch_y_axis(ax, [h["noise_scale"] for h in history] + [b for _, b in optimum],
                  label="examples (batch size / noise scale)")
    ax.set_xlabel("examples seen")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure


def _batch_y_axis(ax: Any, values: Sequence[float], label: str = "global batch size") -> None:
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(batch_size_label))
    ax.yaxis.set_minor_locator(NullLocator())
    if values:
        low, high = min(values), max(values)
        ax.set_ylim(low / 1.5, high * 1.5)
    ax.set_ylabel(label)


def _change_rows(changes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"step": c["step"], "examples_seen": c["examples_seen"], "from": c["previous"],
             "to": c["batch_size"], "noise_scale": c.get("noise_scale"),
             "predicted_gain": c.get("predicted_gain"), "reason": c.get("reason")} for c in changes]


def _notes(sections: Mapping[str, Any], errors: Sequence[str]) -> list[str]:
    notes = [f"error: {error}" for error in errors]
    summary = sections.get("summary")
    if summary:
        changes = sections.get("changes", [])
        notes.append(
            f"Started at batch {summary['start_batch_size']} and ended at "
            f"{summary['final_batch_size']} after {summary['steps']} steps and "
            f"{summary['examples_seen']} examples, with {len(changes)} change(s); "
            f"{summary['measured_steps']} measured steps.")
    history = [h for h in sections.get("history", []) if h.get("noise_scale")]
    if len(history) >= 2:
        notes.append(f"The noise scale went from {history[0]['noise_scale']:.0f} at the first "
                     f"decision to {history[-1]['noise_scale']:.0f} at the last.")
    return notes
