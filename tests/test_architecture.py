"""The code's module graph: rsd_core imports no Flyte or MLflow; the modules of rsd_core, tasks, workflows and
rsd_cli import each other without a circle, counting imports inside functions (which is where circles hide)
and package ``__init__`` modules (a package importing a submodule that imports names from the package is
one); rsd_core imports none of its own modules inside a function; its stages are folders and no file of it is
over 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rsd_core", "tasks", "workflows", "rsd_cli")
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The module that importing ``name`` (a module, or a name inside one) loads last: its longest known prefix."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(_target(node.module, modules))
            found.update(_target(f"{node.module}.{a.name}", modules) for a in node.names)  # submodules by name
        elif isinstance(node, ast.Import):
            found.update(_target(a.name, modules) for a in node.names)
    return found - {None}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as a path that returns to its start, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_circle_in_the_library_the_tasks_the_workflows_or_the_cli():
    graph = _graph()
    assert {"rsd_core.operators.mri", "tasks.serving", "rsd_cli.main"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_circle_hidden_in_a_function_or_a_package():
    graph = _graph()
    graph["rsd_core.operators"] = graph["rsd_core.operators"] | {"rsd_core.config"}  # config -> kinds -> operators
    assert _cycle(graph) is not None
    graph = _graph()
    graph["rsd_core.operators"] = graph["rsd_core.operators"] | {"rsd_core.operators.mri"}  # a package importing
    assert _cycle(graph) is not None  # a submodule that imports the package back


def test_rsd_core_imports_none_of_its_modules_inside_a_function():
    for name, path in _modules().items():
        if not name.startswith("rsd_core"):
            continue
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    assert not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rsd_core")), \
                        f"{path}: {function.name} imports {node.module}"


def test_rsd_core_knows_nothing_of_flyte_or_mlflow():
    for path in (REPO / "rsd_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("flytekit", "mlflow", "tasks", "workflows") for n in names), path


def test_the_stages_are_folders_and_no_library_file_is_long():
    stages = {p.name for p in (REPO / "rsd_core").iterdir() if (p / "__init__.py").exists()}
    assert stages >= {"data", "operators", "train", "select", "restore", "export"}
    long = {str(p.relative_to(REPO)): n for p in (REPO / "rsd_core").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
