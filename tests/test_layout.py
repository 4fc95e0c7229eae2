"""The gateway's layers, as docs/architecture.md draws them: every module's
imports (those inside functions too), read with ``ast``, go one way, down,
and none closes a cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"

# From the top. A module may import its own unit (its sub-package, or itself)
# and any unit of a lower layer; never a unit of its own layer or above. The
# shared vocabulary is one unit: its modules import one another (no cycle).
LAYERS: list[tuple[str, list[str]]] = [
    ("command", ["gateway.__main__"]),
    ("server", ["gateway.server"]),
    ("app", ["gateway.app"]),
    ("entry", ["gateway.pipeline", "gateway.frontends", "gateway.routes"]),
    ("streams", ["gateway.relay", "gateway.resume"]),
    ("services", ["gateway.quotas", "gateway.auth", "gateway.upstream", "gateway.conversations"]),
    (
        "vocabulary",
        [
            "gateway.chat",
            "gateway.config",
            "gateway.downstream",
            "gateway.errors",
            "gateway.exchange",
            "gateway.logs",
            "gateway.metrics",
            "gateway.sse",
            "gateway.state",
            "gateway.timers",
            "gateway.tracing",
            "gateway",
        ],
    ),
]
# Imports that go up, each with its reason; none today.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The gateway modules that ``module`` imports, anywhere in its source."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "gateway")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "gateway":
                continue
            for alias in node.names:  # `from gateway.upstream import client` names a module
                child = f"{target}.{alias.name}"
                found.add(child if child in known else target)
    return {m for m in found if m != module}


def import_graph(root: Path = GATEWAY) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(paths)
    return {
        name: imports_of(path.read_text(), name, path.name == "__init__.py", known)
        for name, path in paths.items()
    }


def unit_of(module: str) -> tuple[int, str]:
    """The module's layer (0 at the top) and its unit."""
    best: tuple[int, str] | None = None
    for depth, (_, units) in enumerate(LAYERS):
        for unit in units:
            inside = module == unit or module.startswith(unit + ".")
            if inside and (best is None or len(unit) > len(best[1])):
                best = (depth, unit)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    if best[0] == len(LAYERS) - 1:
        return best[0], "vocabulary"
    return best


def upward_imports(graph: Mapping[str, Iterable[str]]) -> set[tuple[str, str]]:
    """Imports into a unit of the importer's own layer or a higher one."""
    wrong = set()
    for module, targets in graph.items():
        layer, unit = unit_of(module)
        for target in targets:
            target_layer, target_unit = unit_of(target)
            if target_unit != unit and target_layer <= layer:
                wrong.add((module, target))
    return wrong


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The import cycles: strongly connected sets of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_gateway_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_imports_only_go_down_the_layers() -> None:
    assert upward_imports(import_graph()) == KNOWN_UPWARD


def test_every_module_is_in_a_layer_and_the_top_level_stays_small() -> None:
    graph = import_graph()
    for module in graph:
        unit_of(module)
    top_level = [p for p in GATEWAY.glob("*.py") if p.name != "__init__.py"]
    assert len(top_level) <= 14, sorted(p.name for p in top_level)


def test_the_check_finds_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """The checks above can fail: a relay importing the pipeline is caught
    both as an upward import and as the cycle it closes."""
    graph = {k: set(v) for k, v in import_graph().items()}
    graph["gateway.relay"].add("gateway.pipeline")
    assert ("gateway.relay", "gateway.pipeline") in upward_imports(graph)
    assert any({"gateway.relay", "gateway.pipeline"} <= set(c) for c in cycles(graph))
    # A function-level import in a real file is read too.
    package = tmp_path / "gateway"
    (package / "frontends").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pipeline.py").write_text("from gateway.frontends import chat\n")
    (package / "frontends" / "__init__.py").write_text("")
    (package / "frontends" / "chat.py").write_text(
        "def route():\n    from gateway.pipeline import serve\n"
    )
    found = import_graph(package)
    assert found["gateway.frontends.chat"] == {"gateway.pipeline"}
    assert cycles(found) == [["gateway.frontends.chat", "gateway.pipeline"]]
    assert upward_imports(found) == {
        ("gateway.frontends.chat", "gateway.pipeline"),
        ("gateway.pipeline", "gateway.frontends.chat"),
    }
