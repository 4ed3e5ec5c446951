"""The house's size rules: functions that fit on a screen and modules with one job (issue "one way to do
each thing"): no function or method over 80 lines, no module over 450 lines (docstrings included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([ROOT / "app.py", *(ROOT / "merger").rglob("*.py")])
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: split them by what they do: {long}"


def test_no_module_holds_more_than_one_job() -> None:
    large = [f"{p.relative_to(ROOT)} ({n} lines)" for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not large, f"modules over {MAX_MODULE_LINES} lines: split them by concern: {large}"


def test_the_rule_sees_functions() -> None:
    """The walk above finds nested functions and methods too (a rule that counts nothing cannot fail)."""
    found = {n.name for n in ast.walk(ast.parse((ROOT / "merger" / "jobs" / "worker.py").read_text()))
             if isinstance(n, ast.FunctionDef)}
    assert {"_run_job", "emit", "main"} <= found
