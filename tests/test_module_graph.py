"""The package's import graph, read with `ast` (no import runs): no cycles, and the layers of the pipeline.

config -> plan -> execute -> io (write) -> publish, with the jobs and the UI on top. Imports inside
functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "merger"


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The merger modules (and third-party top-level packages) `path` imports, lazily or not; imports
    under `if TYPE_CHECKING:` are for annotations only and never run, so they are not edges."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []  # ast.walk reads the children after this node: annotation-only imports skipped
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    found.discard(name)
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path, set(MODULES)) for name, path in MODULES.items()}


def _internal(name: str) -> set[str]:
    return {m for m in GRAPH[name] if m in MODULES}


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_every_merger_import_names_a_module_that_exists() -> None:
    missing = {
        (name, target)
        for name, targets in GRAPH.items()
        for target in targets
        if target.startswith("merger") and target not in MODULES
    }
    assert not missing, f"imports of modules that do not exist (run rewrite_imports?): {sorted(missing)}"


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components; any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in _internal(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert cycles == []


# Which merger modules each layer may not import (prefixes).
FORBIDDEN = {
    "merger.config": ("merger.plan", "merger.execute", "merger.io", "merger.publish", "merger.jobs",
                      "merger.engine", "merger.validate", "merger.ui"),
    "merger.plan": ("merger.execute", "merger.jobs", "merger.engine", "merger.validate", "merger.ui"),
    "merger.execute": ("merger.plan.moe", "merger.publish", "merger.jobs", "merger.engine", "merger.validate",
                       "merger.ui"),
    "merger.io": ("merger.execute", "merger.jobs", "merger.engine", "merger.validate", "merger.ui"),
    "merger.publish": ("merger.execute", "merger.plan", "merger.jobs", "merger.engine", "merger.ui"),
    "merger.publish.card": ("merger.publish.hub_read", "merger.publish.hub_push", "merger.publish.hub_calls"),
    # The app's side of the queue: no worker, no engine, no torch.
    "merger.jobs.store": ("merger.jobs.queue", "merger.jobs.worker", "merger.engine", "merger.execute",
                          "merger.plan", "merger.methods"),
    "merger.jobs.database": ("merger.jobs.store", "merger.jobs.queue", "merger.jobs.worker", "merger.engine",
                             "merger.execute", "merger.plan", "merger.methods"),
    "merger.jobs.storage": ("merger.jobs.store", "merger.jobs.queue", "merger.jobs.worker", "merger.engine",
                            "merger.execute", "merger.plan", "merger.methods"),
    "merger.jobs.redis_store": ("merger.jobs.store", "merger.jobs.queue", "merger.jobs.worker", "merger.engine",
                                "merger.execute", "merger.plan", "merger.methods"),
    "merger.jobs.worker_notes": ("merger.jobs.queue", "merger.jobs.worker", "merger.engine", "merger.execute",
                                 "merger.plan", "merger.methods"),
    "merger.jobs.queue": ("merger.jobs.worker", "merger.engine", "merger.execute", "merger.plan", "merger.methods"),
    "merger.scrub": ("merger",),
    # The worker reaches the engine, the evaluation and the Hub through merger.service.run_job only (the
    # app goes through merger.service too: one door for both front ends).
    "merger.jobs.worker": ("merger.engine", "merger.publish", "merger.evaluate", "merger.execute", "merger.plan",
                           "merger.io", "merger.methods", "merger.ui"),
    "merger.jobs.recovery": ("merger.engine", "merger.publish", "merger.evaluate", "merger.execute", "merger.plan",
                             "merger.io", "merger.methods", "merger.ui"),
    # ... and that door knows nothing of the queue or the records: the worker hands it hooks. So the
    # worker/recovery -> service.run_job edges are the only ones from jobs to service, while service.jobs imports
    # the app's side of the queue (store, queue, review): two directions between the packages, no cycle
    # between modules.
    "merger.service.run_job": ("merger.jobs", "merger.ui"),
    "merger.service.options": ("merger.jobs", "merger.engine", "merger.evaluate", "merger.ui"),
    "merger.jobs.review": ("merger.jobs.queue", "merger.jobs.worker", "merger.service", "merger.engine",
                           "merger.execute", "merger.plan", "merger.methods"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_what_is_below_them(layer: str) -> None:
    bad = {
        (name, target)
        for name in GRAPH
        if _in(name, (layer,))
        for target in _internal(name)
        if _in(target, FORBIDDEN[layer]) and target != "merger.errors"
    }
    assert not bad, bad


def test_methods_import_only_torch_the_registry_errors_ranges_and_constants() -> None:
    # constants: the folder the native kernels are built in (MERGER_DATA_DIR)
    allowed_merger = ("merger.methods", "merger.errors", "merger.ranges", "merger.constants")
    allowed_third_party = {"torch"}
    for name, targets in GRAPH.items():
        if not _in(name, ("merger.methods",)):
            continue
        for target in targets:
            top = target.split(".")[0]
            if top == "merger":
                assert _in(target, allowed_merger), (name, target)
            elif top not in allowed_third_party:
                assert top in _STDLIB, (name, target)


def test_only_the_ui_imports_gradio() -> None:
    users = {name for name, targets in GRAPH.items() if any(t.split(".")[0] == "gradio" for t in targets)}
    assert {u for u in users if not _in(u, ("merger.ui",))} == set()


def test_errors_and_constants_are_leaves() -> None:
    for leaf in ("merger.errors", "merger.constants", "merger.ranges", "merger.dtypes", "merger.config.references"):
        assert _internal(leaf) <= {"merger", "merger.errors"}, (leaf, _internal(leaf))


import sys  # noqa: E402

_STDLIB = set(sys.stdlib_module_names) | {"__future__"}
