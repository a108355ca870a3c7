"""The import graph of the tree, read from the source (every import statement, those inside functions
too): packages import only downward (kernels <- engine <- export, training <- benchmarks), and no
module imports one that imports it back (ARCHITECTURE.md)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "engine", "export", "training", "benchmarks")
LAYER = {"kernels": 0, "engine": 1, "export": 2, "training": 2, "benchmarks": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of the tree it imports (`from a.b import c` counts a.b.c when that is a module)."""
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "engine.core" in graph and "engine.graphs" in graph["engine.core"]  # the graph is read at all
    assert cycles(graph) == []


def test_the_detector_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_only_downward():
    upward = [(a, b) for a, targets in import_graph().items() for b in targets
              if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]]
    assert upward == []


# The applications: command lines, the server and the scripts run with `python -m`. The library (every
# other module of kernels/, engine/, export/, training/) never imports one; benchmarks/ measure the library.
APPLICATIONS = ("engine.apps", "training.cli", "training.console", "training.classifier", "export.cli",
                "export.console")


def is_application(module: str) -> bool:
    return any(module == app or module.startswith(app + ".") for app in APPLICATIONS)


def library_imports_of_applications(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if not is_application(a) and is_application(b))


def test_the_library_never_imports_an_application():
    graph = import_graph()
    assert "engine.apps.cli" in graph and "engine.formats.opener" in graph["engine.apps.cli"]  # read at all
    assert library_imports_of_applications(graph) == []


def test_the_application_rule_finds_a_library_import_of_the_cli():
    graph = {"engine.core": {"engine.apps.cli"}, "engine.apps.cli": {"engine.core"},
             "benchmarks.bench_x": {"engine.apps.serve"}, "training.cli": {"engine.apps.clitools"}}
    assert library_imports_of_applications(graph) == [("benchmarks.bench_x", "engine.apps.serve"),
                                                     ("engine.core", "engine.apps.cli")]
