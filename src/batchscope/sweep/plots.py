"""The sweep's figures, drawn from a SweepResult alone (so a saved run.json redraws exactly).

Colour encodes the batch size (log scale: each doubling is the same step), line style the LR
rule. The batch size `tune` predicted, when known, is marked on every figure: a vertical line
where the x axis is the batch size, thicker curves and ringed points elsewhere.
"""

from __future__ import annotations

from typing import Callable, Sequence

import matplotlib
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from batchscope.report.axes import batch_size_axis
from batchscope.sweep.grid import LR_RULES
from batchscope.sweep.results import SweepResult, front_time
from batchscope.sweep.trial_record import TrialRecord

_RULE_STYLES = {"linear": "-", "sqrt": "--", "none": ":", "search": "-."}
_RULE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")
_PREDICTED_STYLE = {"color": "#d62728", "linestyle": "-", "linewidth": 1.6, "alpha": 0.8}
_TARGET_STYLE = {"color": "#444444", "linestyle": "--", "linewidth": 1.0}


def sweep_figures(result: SweepResult) -> list[tuple[str, Figure]]:
    """(caption, figure) pairs in report order; empty when no trial has a curve."""
    if not any(t.curve for t in result.trials):
        return []
    figures = [
        (f"{result.metric_name} vs epochs", curves_figure(result, "epoch", "epochs")),
        (
            f"{result.metric_name} vs training time",
            curves_figure(result, "train_seconds", "training time (s)"),
        ),
        (f"final {result.metric_name} vs batch size", final_metric_figure(result)),
        (_time_label(result) + " vs batch size", time_figure(result)),
        ("Pareto front: time vs quality", pareto_figure(result)),
    ]
    return figures


def curves_figure(result: SweepResult, x_field: str, x_label: str) -> Figure:
    """One line per trial: the metric at each evaluation of the common grid."""
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.add_subplot()
    colours = _colour_map(result.trials)
    for trial in result.trials:
        if not trial.curve:
            continue
        xs = [getattr(point, x_field) for point in trial.curve]
        ys = [point.metric for point in trial.curve]
        predicted = trial.batch_size == result.predicted_batch_size
        ax.plot(
            xs,
            ys,
            color=colours(trial.batch_size),
            linestyle=_RULE_STYLES.get(trial.lr_rule, "-"),
            linewidth=2.8 if predicted else 1.4,
            marker="o" if len(xs) < 12 else None,
            markersize=3,
            label=_label(trial, predicted),
        )
        if trial.outcome != "complete":
            ax.annotate(trial.outcome, (xs[-1], ys[-1]), fontsize=7, alpha=0.7)
    if result.target_metric is not None:
        ax.axhline(result.target_metric, **_TARGET_STYLE, label="target")
    ax.set_xlabel(x_label)
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.set_ylabel(result.metric_name)
    ax.grid(alpha=0.3)
    _legend(ax)
    return figure


def final_metric_figure(result: SweepResult) -> Figure:
    """Final metric per batch size, one line per LR rule; unfinished trials as hollow marks."""
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.add_subplot()
    any_cut = False
    for (rule, trials), colour in zip(_by_rule(result).items(), _RULE_COLOURS):
        done = [t for t in trials if t.full_budget and t.final_metric is not None]
        if done:
            ax.plot(
                [t.batch_size for t in done],
                [t.final_metric for t in done],
                color=colour,
                linestyle=_RULE_STYLES.get(rule, "-"),
                marker="o",
                label=f"LR rule: {rule}",
            )
        cut = [t for t in trials if not t.full_budget and t.final_metric is not None]
        if cut:
            any_cut = True
            ax.scatter(
                [t.batch_size for t in cut],
                [t.final_metric for t in cut],
                facecolors="none",
                edgecolors=colour,
                label=None if done else f"LR rule: {rule}",
            )
    if any_cut:
        ax.scatter([], [], facecolors="none", edgecolors="#7f7f7f",
                   label="hollow: pruned / diverged (last value)")
    _mark_predicted(ax, result)
    if result.target_metric is not None:
        ax.axhline(result.target_metric, **_TARGET_STYLE, label="target")
    batch_size_axis(ax, [t.batch_size for t in result.trials])
    ax.set_ylabel(f"final {result.metric_name}")
    _legend(ax)
    return figure


def time_figure(result: SweepResult) -> Figure:
    """Time to the target (or to the end of the budget) per batch size and rule."""
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.add_subplot()
    has_target = result.target_metric is not None
    for (rule, trials), colour in zip(_by_rule(result).items(), _RULE_COLOURS):
        points = [
            (t.batch_size, front_time(t, has_target))
            for t in trials
            if t.full_budget and front_time(t, has_target) is not None
        ]
        if points:
            ax.plot(
                [b for b, _ in points],
                [s for _, s in points],
                color=colour,
                linestyle=_RULE_STYLES.get(rule, "-"),
                marker="o",
                label=f"LR rule: {rule}",
            )
    _mark_predicted(ax, result)
    batch_size_axis(ax, [t.batch_size for t in result.trials])
    ax.set_ylabel(_time_label(result) + " (s)")
    _legend(ax)
    return figure


def pareto_figure(result: SweepResult) -> Figure:
    """Every full-budget trial as (time, final metric), coloured by batch size; the front as
    labelled stars joined by a step line."""
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.add_subplot()
    has_target = result.target_metric is not None
    colours = _colour_map(result.trials)
    on_front = set(result.front)
    for trial in result.trials:
        time = front_time(trial, has_target)
        if not trial.full_budget or trial.final_metric is None or time is None:
            continue
        ax.scatter(
            [time],
            [trial.final_metric],
            color=colours(trial.batch_size),
            marker="*" if trial.key in on_front else "o",
            s=120 if trial.key in on_front else 36,
            edgecolors=_PREDICTED_STYLE["color"]
            if trial.batch_size == result.predicted_batch_size
            else "none",
            linewidths=1.8,
            zorder=3,
        )
        if trial.key in on_front:  # labelling every point would bury the front in text
            ax.annotate(trial.key, (time, trial.final_metric), fontsize=7, alpha=0.8,
                        xytext=(4, 3), textcoords="offset points")
    front = [t for t in result.front_trials() if front_time(t, has_target) is not None]
    if front:
        ax.step(
            [front_time(t, has_target) for t in front],
            [t.final_metric for t in front],
            where="post",
            color="#2ca02c",
            alpha=0.6,
            label="Pareto front",
        )
    if result.predicted_batch_size is not None:
        ax.plot([], [], "o", markerfacecolor="none", markeredgecolor=_PREDICTED_STYLE["color"],
                label=f"predicted batch {result.predicted_batch_size}")
    ax.set_xlabel(_time_label(result) + " (s)")
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.set_ylabel(f"final {result.metric_name}")
    ax.grid(alpha=0.3)
    _legend(ax)
    return figure


def _time_label(result: SweepResult) -> str:
    if result.target_metric is None:
        return "training time"
    return f"time to {result.metric_name} {result.target_metric:g}"


def _by_rule(result: SweepResult) -> dict[str, list[TrialRecord]]:
    """Trials per LR rule. The grid trains the reference batch once (every rule gives the
    reference LR there), so that trial also starts every other rule's line."""
    groups: dict[str, list[TrialRecord]] = {}
    for trial in sorted(result.trials, key=lambda t: t.batch_size):
        groups.setdefault(trial.lr_rule, []).append(trial)
    reference = result.config.get("reference_batch_size")
    shared = [t for t in result.trials if t.batch_size == reference and t.lr_rule in LR_RULES]
    if len(shared) == 1:
        for rule, trials in groups.items():
            if rule in LR_RULES and shared[0] not in trials:
                trials.insert(0, shared[0])
                trials.sort(key=lambda t: t.batch_size)
    return groups


def _colour_map(
    trials: Sequence[TrialRecord],
) -> Callable[[int], tuple[float, float, float, float]]:
    """batch size -> RGBA colour on a log scale spanning the trials' batch sizes."""
    sizes = [t.batch_size for t in trials] or [1]
    low, high = min(sizes), max(sizes)
    norm = LogNorm(vmin=low, vmax=high if high > low else low * 2)
    palette = matplotlib.colormaps["viridis"]
    return lambda size: palette(0.9 * norm(size))


def _label(trial: TrialRecord, predicted: bool) -> str:
    text = f"B={trial.batch_size} {trial.lr_rule}"
    if trial.lr_rule == "search":
        text = f"B={trial.batch_size} lr={trial.learning_rate:.3g}"
    return text + (" (predicted)" if predicted else "")


def _mark_predicted(ax: Axes, result: SweepResult) -> None:
    if result.predicted_batch_size is not None:
        ax.axvline(result.predicted_batch_size, **_PREDICTED_STYLE,
                   label=f"predicted by tune ({result.predicted_batch_size})")


def _legend(ax: Axes) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, ncol=2 if len(handles) > 8 else 1)

