"""`batchscope probe memory`: the largest batch that fits, and the probes that show it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from batchscope.cli.common import (
    DEVICE_HELP,
    JSON_HELP,
    OPTION_HELP,
    OUT_FILE_HELP,
    WORKLOAD_HELP,
    console,
    parse_options,
    print_json,
    record_path,
    refuse_probe_under_torchrun,
)
from batchscope.probes.memory import (
    DEFAULT_MARGIN,
    MemoryProbeResult,
    parse_size,
    probe_memory,
)
from batchscope.probes.memory_runner import format_bytes
from batchscope.probes.memory_search import DEFAULT_TOLERANCE
from batchscope.record import RunRecord, environment_info
from batchscope.workload import resolve_workload


def command(
    workload: str = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", metavar="KEY=VALUE", help=OPTION_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    memory_budget: Optional[str] = typer.Option(
        None, "--memory-budget",
        help="Peak memory a batch may use, e.g. 4GiB, 512MB, 1.5G. Required on CPU; on a GPU "
        "it lowers the budget from the device's total memory.",
    ),
    margin: float = typer.Option(
        DEFAULT_MARGIN, "--margin", help="Fraction taken off the largest fit for the "
        "recommendation (0.1 = 10%); not taken off a --max-batch-size or dataset bound whose peak "
        "already leaves that share of the budget free."
    ),
    tolerance: float = typer.Option(
        DEFAULT_TOLERANCE, "--tolerance", help="Stop when the gap between the largest fit and "
        "the smallest failure is within this fraction."
    ),
    max_batch_size: Optional[int] = typer.Option(
        None, "--max-batch-size", help="Never probe above this size (the result says so)."
    ),
    isolate: bool = typer.Option(
        False, "--isolate", help="Run each probe in a fresh process (survives the OS OOM killer)."
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    out: Optional[Path] = typer.Option(
        None, "--out", help=OUT_FILE_HELP.format(name="memory.json")
    ),
) -> None:
    """Find the largest batch whose training steps fit in memory."""
    refuse_probe_under_torchrun("memory", workload)  # before --out is touched
    out = record_path(out, "memory.json")
    options = parse_options(option or [])
    budget = parse_size(memory_budget) if memory_budget is not None else None
    result = probe_memory(
        workload, device=device, memory_budget=budget, margin=margin, tolerance=tolerance,
        max_batch_size=max_batch_size, isolate=isolate, workload_options=options,
    )
    if out is not None:
        resolved = resolve_workload(workload, **options)
        RunRecord(
            kind="probe-memory",
            workload=resolved.describe(),
            environment=environment_info(result.device),
            sections={"memory": result.to_dict()},
        ).save(out)
    if json_out:
        print_json(result.to_dict())
        return
    render(result)
    if out is not None:
        console.print(f"run record written to {out}", soft_wrap=True)


def render(result: MemoryProbeResult) -> None:
    """The probes as a table, then the answer."""
    table = Table(title=f"Memory probes on {result.device} "
                        f"(budget {format_bytes(result.budget_bytes)})")
    for column, justify in (("#", "right"), ("batch", "right"), ("fits", "center"),
                            ("peak", "right"), ("seconds", "right"), ("outcome", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for index, probe in enumerate(result.probes, start=1):
        table.add_row(
            str(index),
            str(probe.batch_size),
            # Styled Text, not markup: the console prints strings verbatim (markup=False).
            Text("yes", style="green") if probe.fits else Text("no", style="red"),
            "-" if probe.peak_bytes is None else format_bytes(probe.peak_bytes),
            f"{probe.seconds:.2f}",
            Text(probe.reason),  # a framework's "[enforce fail at ...]" shown as it is
            style="bold" if probe.batch_size == result.max_batch_size else None,
        )
    console.print(table)
    console.print(f"largest verified batch: {result.max_batch_size}", style="bold")
    console.print(f"recommended batch:      {result.recommended_batch_size}", style="bold")
    if result.bytes_per_sample is not None and result.fixed_bytes is not None:
        console.print(f"memory model: {format_bytes(result.fixed_bytes)} + "
                      f"{format_bytes(result.bytes_per_sample)} per example")
    console.print(result.note, markup=False)
