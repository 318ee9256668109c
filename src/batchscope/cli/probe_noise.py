"""`batchscope probe noise`: the gradient noise scale of a workload, with its interval."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from batchscope.cli.common import (
    DEVICE_HELP,
    JSON_HELP,
    OPTION_HELP,
    OUT_FILE_HELP,
    WORKLOAD_HELP,
    console,
    err_console,
    load_workload,
    print_json,
    record_path,
    refuse_probe_under_torchrun,
)
from batchscope.device import resolve_device
from batchscope.probes.noise import DEFAULT_ACCUMULATION, DEFAULT_STEPS, NoiseScaleResult, estimate_noise_scale
from batchscope.record import RunRecord, environment_info


def command(
    workload: str = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", metavar="KEY=VALUE", help=OPTION_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="Independent samples (big batches) to average."),
    micro_batch_size: Optional[int] = typer.Option(
        None, "--micro-batch-size", help="Small batch b (default: reference batch / accumulation)."
    ),
    accumulation: int = typer.Option(DEFAULT_ACCUMULATION, "--accumulation", help="Micro-batches per sample (k >= 2)."),
    method: str = typer.Option("accumulation", "--method", help="accumulation or per_example (small models)."),
    train_steps: int = typer.Option(0, "--train-steps", help="Train this many reference steps first."),
    precondition: Optional[str] = typer.Option(
        None, "--precondition", help="'adam': noise scale of Adam's preconditioned gradient."
    ),
    confidence: float = typer.Option(0.9, "--confidence", help="Level of the interval."),
    seed: int = typer.Option(0, "--seed", help="Seed for the batches drawn."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    out: Optional[Path] = typer.Option(None, "--out",
                                       help=OUT_FILE_HELP.format(name="noise.json")),
) -> None:
    """Measure the gradient noise scale B_simple: the batch size beyond which bigger batches
    stop paying for themselves in fewer steps."""
    refuse_probe_under_torchrun("noise", workload)  # before --out is touched
    out = record_path(out, "noise.json")
    spec = load_workload(workload, option)
    resolved = resolve_device(device)
    if not json_out:
        err_console.print(f"measuring the gradient noise scale of {spec.name} on {resolved} ...")
    result = estimate_noise_scale(
        spec,
        resolved,
        steps=steps,
        micro_batch_size=micro_batch_size,
        accumulation=accumulation,
        method=method,  # type: ignore[arg-type]
        train_steps=train_steps,
        precondition=precondition,  # type: ignore[arg-type]
        confidence=confidence,
        seed=seed,
    )
    if out is not None:
        record = RunRecord(
            kind="probe-noise",
            workload=spec.describe(),
            environment=environment_info(resolved),
            sections={"noise": result.to_dict()},
        )
        record.save(out)
    if json_out:
        print_json(result.to_dict())
        return
    console.print(_table(result))
    for note in result.notes:
        console.print(f"note: {note}")
    if out is not None:
        console.print(f"run record written to {out}")


def _table(result: NoiseScaleResult) -> Table:
    table = Table(title="Gradient noise scale")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    interval = "-"
    if result.ci_low is not None and result.ci_high is not None:
        interval = f"[{result.ci_low:.4g}, {result.ci_high:.4g}]"
    elif result.ci_low is not None and result.status == "lower_bound":
        interval = f"[{result.ci_low:.4g}, ∞): at least {result.ci_low:.4g}"
    rows = [
        ("B_simple (examples)", _fmt(result.b_simple)),
        (f"{result.confidence:.0%} interval", interval),
    ]
    if result.unit == "tokens":
        rows.append(("B_simple (tokens)", _fmt(result.b_simple_tokens)))
    rows += [
        ("|G|^2", _fmt(result.grad_sq_norm)),
        ("tr(Sigma)", _fmt(result.trace_sigma)),
        ("samples", str(result.samples)),
        ("batch sizes (small / big)", f"{result.micro_batch_size} / {result.big_batch_size}"),
        ("method", result.method + (f", {result.precondition}-preconditioned" if result.precondition else "")),
        ("status", f"{result.status}: {result.detail}"),
        ("seconds", f"{result.seconds:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
