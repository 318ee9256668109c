"""What every CLI command shares: loading a workload, rendering JSON, consoles.

Commands parse their options, call one library function and render the result; nothing here
computes anything the library doesn't.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from rich.console import Console

from batchscope.atomic import check_writable_directory
from batchscope.errors import UsageError
from batchscope.record import to_jsonable
from batchscope.workload import Workload, resolve_workload

# Markup off: the text printed here comes from runs and users' code ("[enforce fail at ...]"
# would vanish, "[/x]" would crash); style goes through Text/style arguments instead.
console = Console(markup=False, highlight=False)
err_console = Console(stderr=True, markup=False, highlight=False)

WORKLOAD_HELP = "Built-in workload name (see `batchscope workloads`) or package.module:function."
OPTION_HELP = "Built-in workload option KEY=VALUE (repeatable), e.g. -o train_size=2000."
DEVICE_HELP = "cpu, cuda, cuda:N, mps, xpu or auto (the best available)."
JSON_HELP = "Print the result as JSON on stdout (nothing else goes to stdout)."


def load_workload(spec: str, options: list[str] | None = None) -> Workload:
    """Resolve `--workload` plus `-o KEY=VALUE` options (values parsed as JSON when they can be,
    so `train_size=2000` is an int and `channels_last=true` a bool)."""
    return resolve_workload(spec, **parse_options(options or []))


def parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"workload option {pair!r} is not KEY=VALUE; write e.g. -o train_size=2000")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options[key.strip()] = value
    return options


OUT_FILE_HELP = ("Write the run record (JSON) to this file, or into this existing directory "
                 "as {name}.")


def record_path(out: Path | None, default_name: str) -> Path | None:
    """Where a probe's `--out` record goes, checked before the probe runs: minutes of measuring
    must not end in an unwritable path and a traceback. An existing directory gets
    `default_name` inside it; missing parent directories are created."""
    if out is None:
        return None
    path = out / default_name if out.is_dir() else out
    try:
        check_writable_directory(path.parent)
    except OSError as exc:
        raise UsageError(f"--out {str(out)!r} is not writable ({exc.strerror or exc}); pass a "
                         f"writable file or directory") from None
    return path


def torchrun_processes(environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """This process's job when a launcher (torchrun, or any that sets the same variables) started
    it as one of several: (WORLD_SIZE, its RANK or LOCAL_RANK as "RANK=r"). None when it runs
    alone: no such variables, a job of one process (torchrun --nproc-per-node 1), or a
    WORLD_SIZE that is no number (no launcher writes one)."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", ""))
    except ValueError:
        return None
    # WORLD_SIZE alone may be a user's own variable; torchrun always sets a rank beside it.
    rank_name = next((name for name in ("RANK", "LOCAL_RANK") if name in environ), None)
    if world <= 1 or rank_name is None:
        return None
    return world, f"{rank_name}={environ[rank_name]}"


def refuse_under_torchrun(command: str, why: str, fix: str | Callable[[int], str]) -> None:
    """Raise a UsageError when `batchscope {command}` runs as one of several processes of a
    torchrun job: every rank would run the whole command on its own, on the same device, each
    disturbing the others' memory and timings and all writing the same output. Called first
    thing in a command, before any path is created or anything measured. The one-line message
    names what was seen, `why` (what the ranks would do) and `fix` (given the world size when
    it is a function)."""
    job = torchrun_processes()
    if job is None:
        return
    world, rank = job
    remedy = fix(world) if callable(fix) else fix
    raise UsageError(f"batchscope {command} is running as one of {world} processes of a torchrun "
                     f"job (WORLD_SIZE={world}, {rank}): {why}; {remedy}")


def data_parallel_tune_hint(workload: str) -> str:
    """The command that plans for a data-parallel job, launched the way the user launched this."""
    return f"torchrun ... -m batchscope tune -w {shlex.quote(workload)} --distributed"


def refuse_probe_under_torchrun(probe: str, workload: str) -> None:
    """`batchscope probe {probe}` measures one device: under torchrun it refuses (see
    refuse_under_torchrun), pointing at one plain run or at `tune --distributed`."""
    refuse_under_torchrun(
        f"probe {probe}",
        "every rank would probe the same device while the others disturb its memory and timings, "
        "and all would write the same --out",
        f"a probe measures one device: run it once, without torchrun (batchscope probe {probe} -w "
        f"{shlex.quote(workload)} ...), or for a data-parallel plan run "
        f"{data_parallel_tune_hint(workload)}")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(data), indent=2) + "\n")
    sys.stdout.flush()


def _quiet_optuna() -> None:
    # Optuna logs every trial at INFO through its own handler (the sweep's progress, as Optuna
    # users expect), and sets that level when it is imported: so it is imported here to set it.
    try:
        import optuna
    except ImportError:
        return
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def configure_logging(verbosity: int) -> None:
    """-v / -q for the CLI only: the library never configures logging itself. Quiet (-1) also
    silences the progress lines on stderr and Optuna's per-trial log: only errors remain."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        max(-1, min(verbosity, 2)), logging.DEBUG
    )
    err_console.quiet = verbosity < 0
    if verbosity < 0:
        _quiet_optuna()
    logger = logging.getLogger("batchscope")
    logger.setLevel(level)
    if not any(getattr(h, "_batchscope_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._batchscope_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
