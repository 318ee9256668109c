"""The analysis maths and LR rules stay importable without torch (numpy only, by design)."""

from __future__ import annotations

import ast
from pathlib import Path

import batchscope

PACKAGE = Path(batchscope.__file__).parent
NUMPY_ONLY = sorted((PACKAGE / "analysis").glob("*.py")) + [PACKAGE / "scaling.py", PACKAGE / "adaptive" / "schedule.py"]
ALLOWED_ROOTS = {"__future__", "batchscope", "dataclasses", "math", "numpy", "statistics", "typing"}


def test_analysis_modules_import_only_numpy_and_stdlib():
    for path in NUMPY_ONLY:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
                if node.module and node.module.startswith("batchscope") and not (
                    node.module.startswith("batchscope.analysis") or node.module == "batchscope.errors"
                ):
                    raise AssertionError(f"{path.name} imports {node.module}, which may pull in torch")
            else:
                continue
            assert roots <= ALLOWED_ROOTS, f"{path.name} imports {roots - ALLOWED_ROOTS}"
