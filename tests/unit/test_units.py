"""batchscope.units: memory sizes from text and to text, with exact answers."""

from __future__ import annotations

from typing import Any

import pytest

from batchscope.errors import UsageError
from batchscope.units import format_bytes, parse_size

KiB, MiB, GiB = 2**10, 2**20, 2**30


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4GiB", 4 * GiB), ("4G", 4 * GiB), ("4g", 4 * GiB), ("512MB", 512 * 10**6),
     ("1.5G", int(1.5 * GiB)), (" 3 MiB ", 3 * MiB), ("2k", 2048), ("2KB", 2000), ("1024", 1024),
     ("1024B", 1024), ("0.5TiB", 2**39), (".5K", 512), ("1.", 1), ("1.9", 1), (4096, 4096)],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("four", "memory size 'four' is not a size; write e.g. 4GiB, 512MB or 1.5G"),
     ("-1G", "memory size '-1G' is not a size; write e.g. 4GiB, 512MB or 1.5G"),
     ("", "memory size '' is not a size; write e.g. 4GiB, 512MB or 1.5G"),
     ("G", "memory size 'G' is not a size; write e.g. 4GiB, 512MB or 1.5G"),
     (True, "memory size True is not a size; write e.g. 4GiB, 512MB or 1.5G"),
     ("4XB", "memory size '4XB' has an unknown unit 'XB'; use B, K/KiB, M/MiB, G/GiB, T/TiB "
             "(binary) or KB, MB, GB, TB (decimal)"),
     ("4 GiBs", "memory size '4 GiBs' has an unknown unit 'GiBs'; use B, K/KiB, M/MiB, G/GiB, "
                "T/TiB (binary) or KB, MB, GB, TB (decimal)"),
     ("0", "memory size '0' must be at least one byte; write e.g. 4GiB"),
     ("0.4", "memory size '0.4' must be at least one byte; write e.g. 4GiB"),
     (0, "memory size 0 must be positive; write e.g. 4GiB"),
     (-5, "memory size -5 must be positive; write e.g. 4GiB")],
)
def test_parse_size_rejects_with_one_line_naming_the_value(text: Any, message: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_size(text)
    assert str(raised.value) == message


def test_a_multi_line_size_is_named_on_one_line() -> None:
    with pytest.raises(UsageError) as raised:
        parse_size("four\nGiB")
    assert "\n" not in str(raised.value) and "'four\\nGiB'" in str(raised.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536, "1.50 KiB"),
     (int(1.5 * GiB), "1.50 GiB"), (3 * MiB + 512 * KiB, "3.50 MiB"), (2**40, "1.00 TiB"),
     (5 * 2**50, "5120.00 TiB"), (-2048, "-2.00 KiB"), (100.6, "101 B")],
)
def test_format_bytes(value: float, expected: str) -> None:
    assert format_bytes(value) == expected


def test_parse_and_format_agree() -> None:
    assert format_bytes(parse_size("1.5GiB")) == "1.50 GiB"


def test_old_import_paths_keep_working() -> None:
    # tuning.py and the CLI import these from the memory probe's modules.
    from batchscope.probes.memory import parse_size as from_memory
    from batchscope.probes.memory_runner import format_bytes as from_runner

    assert from_memory is parse_size
    assert from_runner is format_bytes
