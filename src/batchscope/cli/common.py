"""What every CLI command shares: loading a workload, rendering JSON, consoles.

Commands parse their options, call one library function and render the result; nothing here
computes anything the library doesn't.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

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


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(data), indent=2) + "\n")
    sys.stdout.flush()


def configure_logging(verbosity: int) -> None:
    """-v / -q for the CLI only: the library never configures logging itself."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        max(-1, min(verbosity, 2)), logging.DEBUG
    )
    logger = logging.getLogger("batchscope")
    logger.setLevel(level)
    if not any(getattr(h, "_batchscope_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._batchscope_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
