"""`batchscope probe throughput`: samples/s per batch size, the knee, the input pipeline."""

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
    load_workload,
    print_json,
    record_path,
    refuse_probe_under_torchrun,
)
from batchscope.errors import UsageError
from batchscope.probes.throughput import (
    DEFAULT_MAX_SECONDS_PER_POINT,
    DEFAULT_TIMED_STEPS,
    DEFAULT_WARMUP_STEPS,
    ThroughputResult,
    measure_throughput,
)
from batchscope.record import RunRecord, environment_info


def command(
    workload: str = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", metavar="KEY=VALUE", help=OPTION_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    batch_sizes: Optional[str] = typer.Option(
        None, "--batch-sizes", help="Comma-separated batch sizes to measure, e.g. 32,64,128 "
        "(default: powers of two from 8 up to --max-batch-size)."),
    max_batch_size: Optional[int] = typer.Option(
        None, "--max-batch-size", help="Largest batch size of the default grid (default: the "
        "memory probe's recommendation on an accelerator, 256 on CPU)."),
    fraction: float = typer.Option(
        0.95, "--fraction", help="The knee is the smallest batch within this share of the best."),
    warmup_steps: int = typer.Option(DEFAULT_WARMUP_STEPS, "--warmup-steps",
                                     help="Untimed steps per batch size."),
    timed_steps: int = typer.Option(DEFAULT_TIMED_STEPS, "--timed-steps",
                                    help="Timed steps per batch size."),
    max_seconds_per_point: float = typer.Option(
        DEFAULT_MAX_SECONDS_PER_POINT, "--max-seconds-per-point",
        help="Time cap per batch size (at least one warm-up and three timed steps still run)."),
    early_stop: bool = typer.Option(True, "--early-stop/--no-early-stop",
                                    help="Stop growing the batch once throughput has flattened."),
    data_path: bool = typer.Option(True, "--data-path/--no-data-path",
                                   help="Also time the workload's real data loader."),
    variants: bool = typer.Option(False, "--variants/--no-variants",
                                  help="Also measure bf16 autocast + channels_last."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    out: Optional[Path] = typer.Option(None, "--out",
                                       help=OUT_FILE_HELP.format(name="throughput.json")),
) -> None:
    """Measure training throughput at each batch size; report the knee and data bottlenecks."""
    refuse_probe_under_torchrun("throughput", workload)  # before --out is touched
    out = record_path(out, "throughput.json")
    # Bad input and "not even the smallest batch fits" are reported by cli.main, as for every
    # command (one line, exit codes 2 and 1).
    loaded = load_workload(workload, option)
    result = measure_throughput(
        loaded,
        batch_sizes=parse_batch_sizes(batch_sizes) if batch_sizes is not None else None,
        device=device,
        max_batch_size=max_batch_size,
        warmup_steps=warmup_steps,
        timed_steps=timed_steps,
        fraction=fraction,
        early_stop=early_stop,
        data_path=data_path,
        variants=variants,
        max_seconds_per_point=max_seconds_per_point,
    )
    if out is not None:
        record = RunRecord(kind="probe-throughput", workload=loaded.describe(),
                           environment=environment_info(result.device),
                           sections={"throughput": result.to_dict()})
        record.save(out)
    if json_out:
        print_json(result.to_dict())
    else:
        render(result)
        if out is not None:
            console.print(f"run record written to {out}")


def parse_batch_sizes(text: str) -> list[int]:
    """`"32,64, 128"` -> `[32, 64, 128]`; anything else is a one-line usage error."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise UsageError(f"--batch-sizes {text!r} is not a comma-separated list of positive "
                         f"integers; write e.g. --batch-sizes 32,64,128")
    return [int(part) for part in parts]


def render(result: ThroughputResult) -> None:
    tokens = result.unit == "tokens"
    table = Table(title=f"Throughput on {result.device}")
    for column in ("batch", "samples/s", *(("tokens/s",) if tokens else ()), "step ms",
                   "spread", "% of best"):
        table.add_column(column, justify="right")
    best = result.curve.best_samples_per_s
    for point in result.points:
        marks = ("  knee" if point.batch_size == result.knee_batch_size else "") + (
            "  best" if point.batch_size == result.best_batch_size else "")
        table.add_row(
            f"{point.batch_size}{marks}",
            f"{point.samples_per_s:,.1f}",
            *((f"{point.units_per_s:,.0f}",) if tokens else ()),
            f"{point.step_s * 1e3:.2f}",
            f"{point.spread:.0%}" if point.spread == point.spread else "-",
            f"{point.samples_per_s / best:.0%}",
        )
    console.print(table)
    console.print(f"knee: batch {result.knee_batch_size} (smallest within "
                  f"{result.fraction:.0%} of the best; about {result.interpolated_knee_batch_size} "
                  f"on the fitted curve); best: batch {result.best_batch_size} at {best:,.1f} "
                  f"samples/s; {result.seconds:.1f} s")
    if result.stop_reason:
        console.print(f"stopped early: {result.stop_reason}")
    console.print(f"input pipeline: {result.input_pipeline.note}")
    for variant in result.variants:
        console.print(f"variant {variant.name}: best batch {variant.curve.best_batch_size} at "
                      f"{variant.curve.best_samples_per_s:,.1f} samples/s "
                      f"({variant.speedup:.2f}x), knee {variant.curve.knee_batch_size}")
    for note in result.notes:
        console.print(f"note: {note}")
