"""`batchscope workloads`: list the built-in workloads and their reference settings."""

from __future__ import annotations

import typer
from rich.table import Table

from batchscope.cli.common import JSON_HELP, console, print_json
from batchscope.workloads import list_workloads


def command(json_out: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the built-in workloads."""
    entries = list_workloads()
    if json_out:
        print_json({"workloads": entries})
        return
    table = Table(title="Built-in workloads", expand=True)
    for column in ("name", "reference batch", "reference lr", "optimizer"):
        table.add_column(column, no_wrap=True)
    table.add_column("summary", ratio=1)
    for entry in entries:
        table.add_row(
            entry["name"],
            str(entry.get("reference_batch_size", "")),
            str(entry.get("reference_lr", "")),
            str(entry.get("optimizer_family", "")),
            str(entry.get("summary", "")),
        )
    console.print(table)
