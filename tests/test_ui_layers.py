"""The UI reaches the engine, the Hub and the jobs only through merger.service."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What only the service may import on the UI's behalf (the pipeline's layers and the jobs).
BEHIND_THE_SERVICE = {"engine", "execute", "publish", "jobs", "plan", "io", "validate", "stages", "evaluate", "lora"}


def merger_imports(path: Path) -> set[str]:
    """The merger modules a file imports, absolute (`merger.x`) or relative (`.x` in merger/, `..x` in merger/ui/)."""
    package = path.parent.relative_to(ROOT).parts  # () for app.py, ("merger",), ("merger", "ui")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("merger."))
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - node.level + 1]
            dotted = [*base, *(node.module.split(".") if node.module else [])]
        else:
            dotted = (node.module or "").split(".")
        if dotted[:1] != ["merger"]:
            continue
        found.update(dotted[1:2] if len(dotted) > 1 else [a.name for a in node.names])
    return found


def test_the_ui_imports_nothing_behind_the_service() -> None:
    files = [ROOT / "app.py", *sorted((ROOT / "merger" / "ui").glob("*.py"))]
    assert len(files) > 5
    for path in files:
        allowed = {"jobs"} if path.name == "app.py" else set()  # launching starts the worker process
        crossing = merger_imports(path) & (BEHIND_THE_SERVICE - allowed)
        assert not crossing, f"{path.relative_to(ROOT)} imports {sorted(crossing)}: go through merger.service"


SERVICE = sorted((ROOT / "merger" / "service").glob("*.py"))


def test_the_service_imports_no_gradio() -> None:
    assert len(SERVICE) > 3
    for path in SERVICE:
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(name.startswith("gradio") for name in names), path.name


def test_the_import_check_sees_imports() -> None:
    """The check above would catch a crossing: it finds the service's own (lazy) engine imports."""
    found = set().union(*(merger_imports(path) for path in SERVICE))
    assert {"validate", "jobs", "publish", "io", "plan"} <= found
