"""batchscope.checks: the shared argument checks and their one-line wording."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchscope import checks, units
from batchscope.checks import require_int, require_positive_number
from batchscope.errors import UsageError


def message(check: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(UsageError) as raised:
        check(*args, **kwargs)
    return str(raised.value)


@pytest.mark.parametrize(
    ("value", "kwargs", "expected"),
    [(1, {}, 1), (7, {"minimum": 7}, 7), (0, {"minimum": 0}, 0), (10, {"maximum": 10}, 10),
     (np.int64(5), {}, 5)],
)
def test_require_int_accepts_and_returns_a_plain_int(value: Any, kwargs: dict, expected: int) -> None:
    result = require_int("n", value, **kwargs)
    assert result == expected and type(result) is int


@pytest.mark.parametrize(
    ("value", "kwargs", "expected"),
    [(0, {}, "batch_size=0 must be a positive integer"),
     (True, {}, "batch_size=True must be a positive integer"),
     (2.0, {}, "batch_size=2.0 must be a positive integer"),
     ("8", {}, "batch_size='8' must be a positive integer"),
     (None, {}, "batch_size=None must be a positive integer"),
     (1, {"minimum": 2}, "batch_size=1 must be an integer >= 2"),
     (-1, {"minimum": 0}, "batch_size=-1 must be an integer >= 0"),
     (11, {"maximum": 10}, "batch_size=11 must be an integer from 1 to 10"),
     (1, {"minimum": 2, "hint": "two samples make an interval"},
      "batch_size=1 must be an integer >= 2 (two samples make an interval)")],
)
def test_require_int_refuses_with_one_line(value: Any, kwargs: dict, expected: str) -> None:
    assert message(require_int, "batch_size", value, **kwargs) == expected


@pytest.mark.parametrize("value", [0.5, 3, np.float32(0.25), 1e300])
def test_require_positive_number_accepts(value: Any) -> None:
    result = require_positive_number("factor", value)
    assert result == float(value) and type(result) is float


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, "factor=0 must be a positive finite number"),
     (-0.5, "factor=-0.5 must be a positive finite number"),
     (math.inf, "factor=inf must be a positive finite number"),
     (math.nan, "factor=nan must be a positive finite number"),
     (True, "factor=True must be a positive finite number"),
     ("2", "factor='2' must be a positive finite number")],
)
def test_require_positive_number_refuses_with_one_line(value: Any, expected: str) -> None:
    assert message(require_positive_number, "factor", value) == expected


def test_hint_is_appended_in_parentheses() -> None:
    assert (message(require_positive_number, "lr", 0, hint="e.g. 0.1")
            == "lr=0 must be a positive finite number (e.g. 0.1)")


@pytest.mark.parametrize("module", [checks, units], ids=["checks", "units"])
def test_imports_neither_numpy_nor_torch(module: Any) -> None:
    # The analysis code (numpy only) and light CLI paths may use these modules. (The package's
    # __init__ imports torch anyway, so this looks at the module's own imports.)
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "math", "numbers", "re", "typing", "batchscope.errors"}
