"""`batchscope sweep`: train short real trials over batch sizes and show the trade-off.

Parses options, calls `batchscope.sweep.sweep`, renders the table and the Pareto front (or
prints the result JSON with --json). Progress lines go to stderr.
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from batchscope.cli.common import (
    DEVICE_HELP,
    JSON_HELP,
    OPTION_HELP,
    WORKLOAD_HELP,
    console,
    data_parallel_tune_hint,
    err_console,
    parse_options,
    print_json,
    refuse_under_torchrun,
)
from batchscope.sweep.api import sweep
from batchscope.sweep.grid import parse_batch_sizes
from batchscope.sweep.results import SweepResult


def command(
    workload: str = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP),
    batch_sizes: str = typer.Option(
        ..., "--batch-sizes", "-b", help="Comma-separated batch sizes, e.g. 32,64,128,256."
    ),
    lr_rule: str = typer.Option(
        "linear", "--lr-rule", help="LR scaling rule: linear, sqrt, none, or all (each is a grid axis)."
    ),
    epochs: int = typer.Option(1, "--epochs", help="Training epochs per trial."),
    target_metric: Optional[float] = typer.Option(
        None, "--target-metric", help="Quality to reach (e.g. 0.6 accuracy); time-to-target is measured."
    ),
    storage: Optional[str] = typer.Option(
        None,
        "--storage",
        help="Optuna storage (--backend optuna only; Ray keeps its trials in --out): default a "
        "journal file in --out; or a journal path, or a database URL "
        "(postgresql://user:pw@host/db) that workers on several machines share.",
    ),
    study: Optional[str] = typer.Option(
        None, "--study", help="Study name; run again with the same name to resume (default <workload>-<mode>)."
    ),
    backend: str = typer.Option("optuna", "--backend", help="optuna (this process) or ray (Ray Tune)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    out: str = typer.Option("batchscope-sweep", "--out", help="Output directory (record, CSV, report, journal); default ./batchscope-sweep in the "
        "current directory. The same --out and --study resume a sweep."),
    no_pruning: bool = typer.Option(False, "--no-pruning", help="Run every trial to the end of its budget."),
    mode: str = typer.Option("grid", "--mode", help="grid (batch sizes x rules) or search (TPE over batch and LR)."),
    n_trials: Optional[int] = typer.Option(None, "--n-trials", help="Trials to finish in search mode."),
    predicted: Optional[str] = typer.Option(
        None, "--predicted", help="Batch size tune predicted (an integer or a tune run.json) to mark on plots."
    ),
    evals_per_epoch: int = typer.Option(2, "--evals-per-epoch", help="Evaluations per epoch (the samples grid)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every trial (same init and data order per batch size)."),
    micro_batch_size: Optional[int] = typer.Option(
        None, "--micro-batch-size",
        help="Train larger batches as accumulated micro-batches of this size (e.g. what "
        "`probe memory` says fits)."),
    no_report: bool = typer.Option(
        False, "--no-report", help="Skip the figures and HTML (record and CSV are still written)."
    ),
    option: list[str] = typer.Option([], "--option", "-o", metavar="KEY=VALUE", help=OPTION_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Train short real trials over batch sizes (Optuna or Ray Tune) and show time vs quality."""
    refuse_under_torchrun(
        "sweep",
        "every rank would train trials on the same device at once, each disturbing the others' "
        "timings",
        "run it once, without torchrun (for trials in parallel: one `batchscope sweep` per device "
        "sharing --storage and --study, or --backend ray), or for a data-parallel plan run "
        f"{data_parallel_tune_hint(workload)}")

    def progress(message: str) -> None:
        err_console.print(message, markup=False, highlight=False)

    result = sweep(
        workload,
        parse_batch_sizes(batch_sizes),
        lr_rule=[rule.strip() for rule in lr_rule.split(",") if rule.strip()],
        epochs=epochs,
        target_metric=target_metric,
        storage=storage,
        study_name=study,
        backend=backend,
        device=device,
        out_dir=out,
        pruning=not no_pruning,
        mode=mode,
        n_trials=n_trials,
        predicted_batch_size=predicted,
        workload_options=parse_options(option),
        evals_per_epoch=evals_per_epoch,
        seed=seed,
        max_micro_batch_size=micro_batch_size,
        progress=progress,
        report=not no_report,
    )
    if json_out:
        print_json(result.to_dict())
        return
    render(result)


UNCUT_TABLE_WIDTH = 200


def render(result: SweepResult) -> None:
    table = Table(title=f"Sweep: {len(result.trials)} trials ({result.metric_name})")
    for column in ("trial", "batch", "rule", "lr", "outcome", "final", "to target (s)",
                   "train (s)", "samples/s", "front"):
        table.add_column(column, justify="left" if column in ("trial", "rule", "outcome") else "right")
    front = set(result.front)
    for trial in result.trials:
        table.add_row(
            trial.key,
            str(trial.batch_size),
            trial.lr_rule,
            f"{trial.learning_rate:.4g}",
            trial.outcome,
            _num(trial.final_metric),
            _num(trial.time_to_target),
            _num(trial.train_seconds),
            _num(trial.samples_per_second),
            "*" if trial.key in front else "",
        )
    # Piped (no terminal to fit), rich would squeeze ten columns into 80 characters and cut every
    # trial name ("b32-…"); a file or a pager takes the table's own width.
    wide = console if console.is_terminal else Console(
        file=console.file, width=UNCUT_TABLE_WIDTH, markup=False, highlight=False)
    wide.print(table)
    best = result.best()
    if best is not None:
        console.print(f"Pareto front: {', '.join(result.front)}; fastest: {best.key}")
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    for name in ("html", "csv", "record"):
        if name in result.paths:
            console.print(f"{name}: {result.paths[name]}", markup=False)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
