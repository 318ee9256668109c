"""The `batchscope` command: a Typer app whose commands each call one library function.

Usage errors (bad option, bad value, unknown workload) are one line on stderr and exit code 2.
Errors raised by the user's own code are not caught: their traceback is the useful part.
"""

from __future__ import annotations

import sys

import typer

from batchscope import __version__
from batchscope.cli import (common, probe_memory, probe_noise, probe_throughput, report_cmd,
                            sweep_cmd, tune_cmd, workloads_cmd)
from batchscope.errors import ProbeFailedError, UsageError
from batchscope.sweep.results import SweepTrialsFailed

# Recent Typer vendors its own click (older ones use click itself): take the parser's usage-error
# class from Typer's BadParameter instead of importing click, which may not be installed.
_CLICK_USAGE_ERRORS = tuple(
    base for base in typer.BadParameter.__mro__ if base.__name__ == "UsageError"
)
_ABORTS = (typer.Abort,)
INTERRUPTED = 130  # 128 + SIGINT, as shells report a process ended by Ctrl-C

# Plain click help, not Typer's rich panels: this Typer's panels print a value placeholder for
# options that take none ("--json <bool>", "--verbose <int>"), so `-v 2` looked right and failed.
# The plain format (rich_markup_mode=None) shows flags and counted options as flags. Commands
# inherit it from the app they are registered on.

app = typer.Typer(
    name="batchscope",
    help="Measure and recommend the training batch size for a PyTorch workload.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
probe_app = typer.Typer(help="Run one probe (memory, throughput, noise).", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(probe_app, name="probe")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"batchscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, show_default=False,
        help="More log output on stderr; repeat the flag for more: -v info, -vv debug."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    common.configure_logging(-1 if quiet else verbose)


app.command("workloads")(workloads_cmd.command)
app.command("tune")(tune_cmd.command)
app.command("report")(report_cmd.command)
app.command("sweep")(sweep_cmd.command)
probe_app.command("memory")(probe_memory.command)
probe_app.command("throughput")(probe_throughput.command)
probe_app.command("noise")(probe_noise.command)


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="batchscope", standalone_mode=False)
    except _CLICK_USAGE_ERRORS as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # `batchscope` alone prints the help, as users expect
            sys.exit(2)
        _usage_error(exc.format_message(), exc.ctx.command_path if exc.ctx else "batchscope")
    except UsageError as exc:
        _usage_error(str(exc), None)
    except (ProbeFailedError, SweepTrialsFailed) as exc:
        # An answer about the machine ("not even batch 1 fits") or about trials whose results
        # were saved and that a rerun resumes: no traceback, exit code 1.
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        sys.exit(1)
    except _ABORTS:
        code = INTERRUPTED
    if code == INTERRUPTED:  # Typer turns Ctrl-C into this exit code, without a word
        sys.stderr.write("aborted: interrupted (Ctrl-C); the run record tune had started is kept "
                         "with what it had measured\n")
    sys.exit(code if isinstance(code, int) else 0)


def _usage_error(message: str, command_path: str | None) -> None:
    one_line = " ".join(message.split())
    hint = f" (see `{command_path} --help`)" if command_path else ""
    sys.stderr.write(f"error: {one_line}{hint}\n")
    sys.exit(2)


if __name__ == "__main__":
    run()
