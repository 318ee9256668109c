"""`batchscope tune`: all probes, a recommendation and the report, in one command."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
import typer
from rich.table import Table
from rich.text import Text

from batchscope.cli.common import (DEVICE_HELP, JSON_HELP, OPTION_HELP, WORKLOAD_HELP, console,
                                   err_console, parse_options, print_json, refuse_under_torchrun)
from batchscope.errors import UsageError
from batchscope.report.tune_report import summary_rows
from batchscope.tuning import tune


def command(
    workload: str = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP),
    option: list[str] = typer.Option([], "--option", "-o", metavar="KEY=VALUE", help=OPTION_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    budget: float = typer.Option(
        300.0, "--budget",
        help="Most seconds to spend on all probes, a ceiling: tune stops once it has its answer (at least 10; a GPU ResNet-18 needs about 20, a CPU minutes)."),
    target: str = typer.Option("time", "--target", help="time (fastest to target) or examples."),
    optimizer_family: Optional[str] = typer.Option(
        None, "--optimizer-family", help="sgd (linear LR rule) or adam (sqrt); default: the workload's."),
    lr_rule: Optional[str] = typer.Option(
        None, "--lr-rule",
        help="linear, sqrt, none, or adascale (the measured noise scale's gain); default: the family's."),
    memory_budget: Optional[str] = typer.Option(
        None, "--memory-budget", help="Memory budget, e.g. 4GiB (CPU default: 1/4 of RAM, at most 2GiB)."),
    world_size: Optional[int] = typer.Option(
        None, "--world-size",
        help="Plan for this many data-parallel (DDP) devices: global batch, per-device share, LR of the global batch; probes run on this one. Default: torch.distributed's, else 1."),
    distributed: bool = typer.Option(
        False, "--distributed",
        help="Run on every rank of a torchrun job (torchrun --nproc-per-node N -m batchscope tune ... --distributed): rank 0 measures, every rank checks the per-device batch, rank 0 prints and writes."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for run.json, report.html, plots."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Measure memory, throughput and noise scale; recommend batch size, LR, warmup, accumulation."""
    if distributed and world_size is not None:
        raise UsageError("--distributed plans for the torchrun job's world size; drop --world-size")
    if not distributed:
        refuse_under_torchrun(
            "tune",
            "without --distributed every rank would tune on its own, on the same device, "
            "disturbing the others' measurements, and all would write the same --out",
            lambda world: "add --distributed (rank 0 measures for the job, every rank checks the "
            f"batch), or run it once without torchrun with --world-size {world} to plan for "
            f"{world} devices")
    # Under torchrun only rank 0 draws the progress line (the ranks share one terminal).
    shows_progress = not distributed or os.environ.get("RANK", "0") == "0"
    with _torchrun_job(device) if distributed else contextlib.nullcontext(device) as where:
        with err_console.status("tuning…") if shows_progress else contextlib.nullcontext() as status:
            result = tune(
                workload, device=where, budget_s=budget, target=target,
                optimizer_family=optimizer_family, lr_rule=lr_rule, memory_budget=memory_budget,
                out_dir=out, workload_options=parse_options(option),
                progress=(lambda message: status.update(f"tuning: {message}")) if shows_progress
                else (lambda message: None), world_size=world_size, distributed=distributed,
            )
        if distributed and torch.distributed.get_rank() != 0:
            return  # rank 0 prints; every rank got the same result
    if json_out:
        print_json(result.record.to_dict()["sections"]
                   | {"errors": result.record.errors, "record_path": _path(out, "run.json")})
        return
    table = Table(title=f"batchscope recommendation — {result.record.workload['name']}")
    for column in ("setting", "reference", "recommended"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for row in summary_rows(result.record.sections, result.record.workload):
        table.add_row(*(_cell(row[c]) for c in ("setting", "reference", "recommended")))
    console.print(table)
    for line in result.recommendation.rationale:
        console.print(f"  • {line}", highlight=False)
    for line in result.recommendation.caveats:
        console.print(Text.assemble("  ", ("caveat: ", "yellow"), line))
    for line in result.record.errors:
        console.print(Text.assemble("  ", ("note: ", "red"), line))
    if out is not None:
        console.print(f"run record: {out / 'run.json'}\nreport:     {out / 'report.html'}")
    console.print(f"({result.seconds:.0f}s)")


@contextlib.contextmanager
def _torchrun_job(device: Optional[str]) -> Iterator[torch.device]:
    from batchscope.tune_distributed import join_torchrun_job

    where = join_torchrun_job(device)
    try:
        yield where
    finally:
        torch.distributed.destroy_process_group()


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def _path(out: Optional[Path], name: str) -> Optional[str]:
    return str(out / name) if out is not None else None
