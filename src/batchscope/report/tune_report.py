"""The tune report: a self-contained HTML page plus PNG/SVG plots, from a run record alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from batchscope.record import RunRecord
from batchscope.report.html import PLOTS_DIR, REPORT_NAME, save_figures, write_html_report
from batchscope.report.tune_plots import tune_figures


def write_tune_report(record: RunRecord, out_dir: str | Path, html_path: str | Path | None = None) -> Path:
    """Render `record` into `out_dir` (plots) and `html_path` (default `out_dir/report.html`)."""
    out = Path(out_dir)
    sections = record.sections
    reference = record.workload.get("reference_batch_size")
    figures = tune_figures(sections, reference)
    return write_html_report(
        html_path or out / REPORT_NAME,
        title=f"batchscope tune — {record.workload.get('name', 'workload')}",
        subtitle=_subtitle(record),
        figures=save_figures(out / PLOTS_DIR, figures),
        tables=_tables(sections, record.workload),
        notes=_notes(sections, record.errors),
    )


def summary_rows(sections: Mapping[str, Any], workload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Recommendation next to the reference settings (also used by the console summary)."""
    rec = sections.get("recommendation")
    if not rec:
        return []
    world = int(rec.get("world_size") or 1)
    reference = workload.get("reference_batch_size")
    devices = [{"setting": "data-parallel devices", "reference": world, "recommended": world}]
    return (devices if world > 1 else []) + [
        {"setting": "global batch size", "reference": reference, "recommended": rec["batch_size"]},
        {"setting": "per-device batch", "recommended": rec["per_device_batch_size"],
         "reference": -(-reference // world) if isinstance(reference, int) else reference},
        {"setting": "gradient accumulation", "reference": 1, "recommended": rec["grad_accumulation"]},
        {"setting": "learning rate", "reference": workload.get("reference_lr"),
         "recommended": rec["learning_rate"]},
        {"setting": "LR rule", "reference": "—", "recommended": rec["lr_rule"]},
        {"setting": "warmup steps", "reference": 0, "recommended": _warmup(rec)},
        {"setting": "predicted speed-up", "reference": 1.0,
         "recommended": rec.get("predicted_speedup_vs_reference")},
    ]


def _warmup(rec: Mapping[str, Any]) -> Any:
    """Steps; "~N epochs" when the LR needs warmup but steps per epoch were unknown."""
    epochs = rec.get("warmup_epochs") or 0
    return f"~{epochs:g} epochs" if not rec["warmup_steps"] and epochs else rec["warmup_steps"]


def _tables(sections: Mapping[str, Any], workload: Mapping[str, Any]) -> list[tuple[str, list[dict]]]:
    tables: list[tuple[str, list[dict]]] = []
    summary = summary_rows(sections, workload)
    if summary:
        tables.append(("Recommendation", summary))
    memory = sections.get("memory")
    if memory:
        tables.append(("Memory probes", [
            {"batch_size": p["batch_size"], "peak_MiB": None if p.get("peak_bytes") is None
             else p["peak_bytes"] / 2**20, "fits": "yes" if p["fits"] else "no", "seconds": p["seconds"]}
            for p in memory.get("probes", [])]))
    throughput = sections.get("throughput")
    if throughput:
        tables.append(("Throughput", [
            {"batch_size": p["batch_size"], "samples_per_s": p["samples_per_s"], "step_s": p["step_s"],
             "spread": p.get("spread")} for p in throughput.get("points", [])]))
    noise = sections.get("noise")
    if noise:
        tables.append(("Gradient noise scale", [{key: noise.get(key) for key in (
            "b_simple", "ci_low", "ci_high", "grad_sq_norm", "trace_sigma", "samples", "status")}]))
    ranks = sections.get("ranks")
    if ranks:  # a tune called on every rank of a data-parallel job (tune_distributed)
        tables.append((f"Per-device batch {ranks['per_device_batch_size']} checked on every rank", [
            {"rank": c["rank"], "fits": "yes" if c["fits"] else "no",
             "peak_MiB": None if c.get("peak_bytes") is None else c["peak_bytes"] / 2**20}
            for c in ranks.get("checked", [])]))
    return tables


def _notes(sections: Mapping[str, Any], errors: list[str]) -> list[str]:
    rec = sections.get("recommendation") or {}
    notes = list(rec.get("rationale", []))
    notes += [f"Caveat: {c}" for c in rec.get("caveats", [])]
    # What each probe said about itself (caps, early stops, measurement conditions).
    memory = sections.get("memory") or {}
    if memory.get("note"):
        notes.append(f"Memory probe: {memory['note']}")
    throughput = sections.get("throughput") or {}
    if throughput.get("stop_reason"):
        notes.append(f"Throughput probe stopped early: {throughput['stop_reason']}.")
    notes += [f"Throughput probe: {n}" for n in throughput.get("notes", [])]
    pipeline = throughput.get("input_pipeline") or {}
    if pipeline.get("note") and not pipeline.get("bottleneck"):  # a bottleneck is a caveat above
        notes.append(f"Input pipeline: {pipeline['note']}.")
    notes += [f"Noise probe: {n}" for n in (sections.get("noise") or {}).get("notes", [])]
    notes += [f"Goodput model: {n}" for n in (sections.get("goodput") or {}).get("notes", [])]
    notes += [f"Error: {e}" for e in errors]
    return notes


def _subtitle(record: RunRecord) -> str:
    env = record.environment
    return (f"{record.created_at} · {env.get('device_name', '?')} ({env.get('device', '?')}) · "
            f"torch {env.get('torch', '?')} · {env.get('cpu_count', '?')} CPUs")
