"""The package's import graph: no cycles, and imports go one way along the pipeline
validation/storage/arrays/memory/data <- backends <- model <- curvature <- optim
<- {theory, experiments, bench, trajectory} <- testing <- cli."""

import ast
from pathlib import Path

import kldwrm_ref

PACKAGE = Path(kldwrm_ref.__file__).parent
LAYERS = {"validation": 0, "storage": 0, "arrays": 0, "memory": 0, "data": 1, "backends": 1, "model": 2, "curvature": 3, "optim": 4, "theory": 6, "experiments": 6, "bench": 6, "trajectory": 6, "testing": 7, "cli": 8}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every kldwrm_ref module ``path`` imports, at any depth of the file (function-level too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kldwrm_ref"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("kldwrm_ref"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = {t for t in imports(path) if t in modules and t != name}
        edges[name] = {t for t in targets if not name.startswith(t + ".")}  # a module may import its own package
    return edges


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_imports_go_one_way_along_the_pipeline():
    wrong = []
    for source, targets in graph().items():
        if top(source) == "__init__":
            continue
        for target in targets:
            if top(target) != "__init__" and LAYERS[top(target)] > LAYERS[top(source)]:
                wrong.append(f"{source} -> {target}")
            if top(target) != top(source) and LAYERS[top(target)] == LAYERS[top(source)] and LAYERS[top(source)] >= 6:
                wrong.append(f"{source} -> {target} (siblings)")
    assert not wrong, wrong


def test_every_module_is_placed_in_the_pipeline():
    assert {top(name) for name in graph()} - {"__init__"} <= set(LAYERS)
