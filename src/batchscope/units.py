"""Memory sizes between people and bytes: `parse_size("4GiB")` and `format_bytes(1536)`.

Kept free of numpy/torch so the CLI, the probes and the analysis code can all share it.
"""

from __future__ import annotations

import re

from batchscope.errors import UsageError

_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_BINARY = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_EXAMPLES = "write e.g. 4GiB, 512MB or 1.5G"


def parse_size(text: str | int) -> int:
    """Bytes from a size: "4GiB" and "4G" are binary (2**30, as `free -h` and docker read
    them), "512MB" decimal (10**6), a bare number (or an int) is bytes. Fractions are allowed
    ("1.5G") and rounded down to whole bytes; the result is at least one byte.

    Raises:
        UsageError: not a size, an unknown unit, or less than one byte.
    """
    if isinstance(text, bool):
        raise UsageError(f"memory size {text!r} is not a size; {_EXAMPLES}")
    if isinstance(text, int):
        if text <= 0:
            raise UsageError(f"memory size {text} must be positive; write e.g. 4GiB")
        return text
    match = _SIZE_PATTERN.match(str(text))
    if match is None:
        raise UsageError(f"memory size {text!r} is not a size; {_EXAMPLES}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit in ("", "b"):
        factor = 1
    elif len(unit) == 1 and unit in _BINARY:
        factor = _BINARY[unit]
    elif len(unit) == 3 and unit.endswith("ib") and unit[0] in _BINARY:
        factor = _BINARY[unit[0]]
    elif len(unit) == 2 and unit.endswith("b") and unit[0] in _DECIMAL:
        factor = _DECIMAL[unit[0]]
    else:
        raise UsageError(
            f"memory size {text!r} has an unknown unit {match.group(2)!r}; use B, K/KiB, "
            f"M/MiB, G/GiB, T/TiB (binary) or KB, MB, GB, TB (decimal)"
        )
    size = int(number * factor)
    if size <= 0:
        raise UsageError(f"memory size {text!r} must be at least one byte; write e.g. 4GiB")
    return size


def format_bytes(value: float) -> str:
    """`1536 -> "1.50 KiB"`, `1610612736 -> "1.50 GiB"`: binary units, as allocators report
    them; whole bytes below 1 KiB, TiB is the largest unit."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"
