"""Input checks shared by the analysis maths: bad input becomes a one-line `UsageError` that names
the value and the fix, so a wrong call fails at the boundary instead of as a NaN three modules later."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from batchscope.errors import UsageError


def positive_number(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """`value` as a float > 0 (bools are rejected: True is not a batch size)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UsageError(f"{name}={value!r} is not a number; pass a positive number")
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not allow_inf) or number <= 0:
        raise UsageError(f"{name}={value!r} must be a positive finite number; pass a value > 0")
    return number


def positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1; integral floats (128.0) are accepted, 12.5 is not."""
    number = positive_number(name, value)
    if number != int(number):
        raise UsageError(f"{name}={value!r} is not a whole number; pass an integer >= 1")
    return int(number)


def fraction_in_open_unit(name: str, value: Any) -> float:
    """A fraction strictly between 0 and 1 (a confidence level, a 'within x of the best' share)."""
    number = positive_number(name, value)
    if not number < 1.0:
        raise UsageError(f"{name}={value!r} must be strictly between 0 and 1, e.g. 0.95")
    return number


def positive_array(name: str, values: Any) -> np.ndarray:
    """A non-empty 1-D float array of finite values > 0."""
    array = finite_array(name, values)
    if np.any(array <= 0):
        bad = array[array <= 0][0]
        raise UsageError(f"{name} contains {bad!r}; every value must be > 0")
    return array


def finite_array(name: str, values: Any) -> np.ndarray:
    """A non-empty 1-D float array of finite values (negative allowed: estimators can be < 0)."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise UsageError(f"{name}={values!r} is not a sequence of numbers") from None
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1 or array.size == 0:
        raise UsageError(f"{name} must be a non-empty 1-D sequence of numbers (got shape {array.shape})")
    if not np.all(np.isfinite(array)):
        raise UsageError(f"{name} contains NaN or inf; drop the failed measurements before calling")
    return array


def same_length(first: str, a: np.ndarray, second: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise UsageError(f"{first} has {a.size} values but {second} has {b.size}; pass one per batch size")


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/inf: a non-finite result is reported as None (absent), never as a made-up number."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
