"""The four plots of a tune report, drawn from a run record's sections alone.

Working from the saved JSON (not live objects) is what lets `batchscope report RUN.json` redraw
any past run exactly. Each function returns a matplotlib Figure, or None when its section is
missing (a run that stopped early still gets a report of what it measured).
"""

from __future__ import annotations

from typing import Any, Mapping

from matplotlib.figure import Figure

from batchscope.report.axes import batch_size_axis

_GIB = 1024**3
_REFERENCE_STYLE = {"color": "#8a8a8a", "linestyle": "--", "linewidth": 1.2}
_RECOMMEND_STYLE = {"color": "#d62728", "linestyle": "-", "linewidth": 1.6}


def memory_figure(memory: Mapping[str, Any] | None) -> Figure | None:
    """Peak memory per probed batch (fit / OOM), the affine fit, the budget and the picks."""
    if not memory or not memory.get("probes"):
        return None
    figure = Figure(figsize=(6.4, 4.0))
    ax = figure.add_subplot()
    probes = memory["probes"]
    fits = [p for p in probes if p.get("fits") and p.get("peak_bytes") is not None]
    fails = [p for p in probes if not p.get("fits")]
    ax.scatter([p["batch_size"] for p in fits], [p["peak_bytes"] / _GIB for p in fits],
               color="#1f77b4", label="fits", zorder=3)
    if fails:
        budget = (memory.get("budget_bytes") or 0) / _GIB
        ax.scatter([p["batch_size"] for p in fails],
                   [(p.get("peak_bytes") or 0) / _GIB or budget for p in fails],
                   marker="x", color="#d62728", label="out of memory / over budget", zorder=3)
    fixed, per_sample = memory.get("fixed_bytes"), memory.get("bytes_per_sample")
    sizes = [p["batch_size"] for p in probes]
    if fixed is not None and per_sample is not None and sizes:
        top = max(sizes)
        ax.plot([0, top], [fixed / _GIB, (fixed + per_sample * top) / _GIB],
                color="#1f77b4", alpha=0.5, label="fit: fixed + B·per-sample")
    if memory.get("budget_bytes"):
        ax.axhline(memory["budget_bytes"] / _GIB, color="#444", linewidth=1, label="budget")
    if memory.get("recommended_batch_size"):
        # A search stopped by a bound far from the memory edge recommends the bound itself.
        at_bound = memory.get("recommended_is_bound") and memory.get("capped_by")
        label = f"limit ({memory['capped_by']})" if at_bound else "recommended (with margin)"
        ax.axvline(memory["recommended_batch_size"], **_RECOMMEND_STYLE, label=label)
    ax.set_xlabel("batch size")
    ax.set_ylabel("peak memory (GiB)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure


def throughput_figure(throughput: Mapping[str, Any] | None,
                      goodput: Mapping[str, Any] | None = None) -> Figure | None:
    """Measured samples/s (with spread), the fitted model, the knee and the best size."""
    if not throughput or not throughput.get("points"):
        return None
    figure = Figure(figsize=(6.4, 4.0))
    ax = figure.add_subplot()
    points = throughput["points"]
    xs = [p["batch_size"] for p in points]
    ys = [p["samples_per_s"] for p in points]
    errors = [(p.get("spread") or 0.0) * p["samples_per_s"] for p in points]
    ax.errorbar(xs, ys, yerr=errors, fmt="o", color="#1f77b4", capsize=3, label="measured (median ± spread)")
    curve = (goodput or {}).get("curve") or []
    fitted = [(c["batch_size"], c["samples_per_s"]) for c in curve
              if c.get("accumulation") == 1 and c.get("samples_per_s")]
    if fitted:
        ax.plot(*zip(*fitted), color="#1f77b4", alpha=0.5, label="throughput model")
    if throughput.get("knee_batch_size"):
        ax.axvline(throughput["knee_batch_size"], color="#2ca02c", linestyle=":", label="knee")
    batch_size_axis(ax)
    ax.set_ylabel("samples / s")
    ax.legend(fontsize=8)
    return figure


def noise_figure(noise: Mapping[str, Any] | None, goodput: Mapping[str, Any] | None = None,
                 reference_batch_size: int | None = None) -> Figure | None:
    """Statistical efficiency vs batch size implied by the noise scale, with its interval."""
    if not noise:
        return None
    figure = Figure(figsize=(6.4, 4.0))
    ax = figure.add_subplot()
    b_noise = noise.get("b_simple")
    curve = (goodput or {}).get("curve") or []
    sizes = sorted({c["batch_size"] for c in curve}) or [2**k for k in range(3, 14)]
    base = reference_batch_size or sizes[0]
    faded = {"color": "#9467bd", "alpha": 0.35, "linestyle": "--"}
    lines = [(b_noise, {"color": "#9467bd"}, "B_noise = "), (noise.get("ci_low"), faded, "CI low = "),
             (noise.get("ci_high"), faded, "CI high = ")]
    if noise.get("status") == "lower_bound":
        # Only "at least" is known, and the plan used the bound: draw it as the estimate.
        lines = [(noise.get("ci_low"), {"color": "#9467bd"}, "B_noise ≥ "),
                 (b_noise, faded, "point estimate ")]
    for value, style, label in lines:
        if value is not None and value > 0:
            efficiency = [(value + base) / (value + b) for b in sizes]
            ax.plot(sizes, efficiency, label=f"efficiency, {label}{value:,.0f}", **style)
            if style is not faded:
                ax.axvline(value, color="#9467bd", alpha=0.4, linewidth=1)
    if not (lines[0][0] or 0) > 0:
        ax.text(0.5, 0.5, f"noise scale not usable: {noise.get('status', 'unknown')}",
                transform=ax.transAxes, ha="center")
    batch_size_axis(ax)
    ax.set_ylim(0, 1.05 if base <= sizes[0] else None)
    ax.set_ylabel("statistical efficiency vs reference")
    ax.set_title(f"gradient noise scale B_simple (n={noise.get('samples', '?')} samples)", fontsize=9)
    ax.legend(fontsize=8)
    return figure


def time_to_target_figure(goodput: Mapping[str, Any] | None,
                          recommendation: Mapping[str, Any] | None = None,
                          reference_batch_size: int | None = None) -> Figure | None:
    """Predicted time to target (relative to the reference) vs batch, picks marked."""
    if not goodput or not goodput.get("curve"):
        return None
    figure = Figure(figsize=(6.4, 4.0))
    ax = figure.add_subplot()
    # Infeasible candidates (no accumulation plan within the limit) have no time to plot.
    curve = [c for c in goodput["curve"] if c.get("relative_time") is not None
             and c.get("accumulation") is not None]
    direct = [c for c in curve if c["accumulation"] == 1]
    accumulated = [c for c in curve if c["accumulation"] > 1]
    ax.plot([c["batch_size"] for c in direct], [c["relative_time"] for c in direct],
            "o-", color="#ff7f0e", label="fits in memory")
    if accumulated:
        ax.plot([c["batch_size"] for c in accumulated], [c["relative_time"] for c in accumulated],
                "s--", color="#ff7f0e", alpha=0.6, label="with gradient accumulation")
    good = goodput.get("good_range")
    if good:
        ax.axvspan(good[0], good[1], color="#ff7f0e", alpha=0.12, label="within 10% of best")
    if reference_batch_size:
        ax.axvline(reference_batch_size, **_REFERENCE_STYLE, label=f"reference ({reference_batch_size})")
    if recommendation and recommendation.get("batch_size"):
        ax.axvline(recommendation["batch_size"], **_RECOMMEND_STYLE,
                   label=f"recommended ({recommendation['batch_size']})")
    batch_size_axis(ax, label="global batch size")
    ax.set_ylabel("predicted time to target (reference = 1)")
    ax.legend(fontsize=8)
    return figure


def tune_figures(sections: Mapping[str, Any], reference_batch_size: int | None) -> list[tuple[str, Figure]]:
    """All tune plots that the record has data for, titled for the report."""
    goodput = sections.get("goodput")
    candidates = [
        ("Peak memory vs batch size", memory_figure(sections.get("memory"))),
        ("Throughput vs batch size", throughput_figure(sections.get("throughput"), goodput)),
        ("Gradient noise scale", noise_figure(sections.get("noise"), goodput, reference_batch_size)),
        ("Predicted time to target vs batch size",
         time_to_target_figure(goodput, sections.get("recommendation"), reference_batch_size)),
    ]
    return [(title, figure) for title, figure in candidates if figure is not None]
