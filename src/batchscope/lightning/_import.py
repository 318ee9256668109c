"""Lightning is optional (`pip install 'batchscope[lightning]'`); this is the one place that
imports it, so a missing install is one line naming the fix, not a traceback."""

from __future__ import annotations

from types import ModuleType

from batchscope.errors import UsageError

LIGHTNING_HINT = "batchscope.lightning needs Lightning 2.x: pip install 'batchscope[lightning]'"


def import_lightning() -> ModuleType:
    """`lightning.pytorch`, or a `UsageError` with the install hint."""
    try:
        import lightning.pytorch as pl
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "lightning":
            raise UsageError(LIGHTNING_HINT) from None
        raise
    return pl
