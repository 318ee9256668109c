"""Argument checks shared by the public entry points, with the project's one wording.

    steps = require_int("steps", steps, minimum=2, hint="the first step allocates the optimizer state")
    -> UsageError("steps=1 must be an integer >= 2 (the first step allocates the optimizer state)")

Every message is one line, `name=value must be ...`, naming the value and what would be
accepted. numpy/torch-free, so any module (the analysis code included) can use it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from batchscope.errors import UsageError


def require_int(
    name: str, value: Any, *, minimum: int = 1, maximum: int | None = None,
    hint: str | None = None,
) -> int:
    """`value` as an int, when it is an integer (not a bool: `True` is no batch size) within
    [minimum, maximum]; numpy integers are accepted. Otherwise a `UsageError`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        if maximum is not None:
            expected = f"an integer from {minimum} to {maximum}"
        elif minimum == 1:
            expected = "a positive integer"
        else:
            expected = f"an integer >= {minimum}"
        raise _usage_error(name, value, expected, hint)
    return int(value)


def require_positive_number(name: str, value: Any, *, hint: str | None = None) -> float:
    """`value` as a float, when it is a finite real number > 0 (not a bool); numpy scalars
    are accepted. Otherwise a `UsageError`."""
    if not _finite_real(value) or value <= 0:
        raise _usage_error(name, value, "a positive finite number", hint)
    return float(value)


def require_finite_number(name: str, value: Any, *, hint: str | None = None) -> float:
    """`value` as a float, when it is a finite real number (not a bool, NaN or infinity);
    numpy scalars are accepted. Otherwise a `UsageError`."""
    if not _finite_real(value):
        raise _usage_error(name, value, "a finite number", hint)
    return float(value)


def _finite_real(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, numbers.Real)
            and math.isfinite(value))


def _usage_error(name: str, value: Any, expected: str, hint: str | None) -> UsageError:
    suffix = f" ({hint})" if hint else ""
    return UsageError(f"{name}={value!r} must be {expected}{suffix}")
