"""The project's modules import one another without a circle, and none imports inside a function to dodge one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from paths import REPO_ROOT

PACKAGES = ("functions", "models", "configs", "Dali")
TOP_MODULES = ("multicropdataset", "run_sflmoco", "run_sflswav")
# Imported inside a function on purpose: optional or heavy dependencies, loaded only when a feature needs them.
OPTIONAL = ("matplotlib", "nvidia", "fvcore", "scipy", "h5py", "submitit", "grpc", "Dali", "multicropdataset",
            "torch.utils.tensorboard", "tensorboard", "torchvision", "PIL", "safetensors", "yaml")


def project_modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    """Every module of the project by dotted name (packages by their __init__)."""
    modules = {name: root / f"{name}.py" for name in TOP_MODULES}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that `name` (a module, or a module's attribute) lies in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], list[tuple[int, str]]]:
    """(project modules imported at module level, [(line, imported name)] of imports inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top: set[str] = set()
    inner: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue  # annotations only: never executed
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.Import):
                    names = [alias.name for alias in child.names]
                else:
                    base = child.module or ""
                    if child.level:
                        anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(anchor + ([base] if base else []))
                    names = [f"{base}.{alias.name}" for alias in child.names] or [base]
                for name in names:
                    if in_function:
                        inner.append((child.lineno, name))
                    target = _resolve(name, modules)
                    if target is not None and target != module and not in_function:
                        top.add(target)
            visit(child, nested)

    visit(tree, False)
    return top, inner


def import_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {module: imports_of(module, path, modules)[0] for module, path in modules.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_project_has_no_import_circle():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_no_import_inside_a_function_except_optional_dependencies():
    modules = project_modules()
    dodged = [f"{path.relative_to(REPO_ROOT)}:{line} imports {name}"
              for module, path in modules.items()
              for line, name in imports_of(module, path, modules)[1]
              if _resolve(name, modules) is not None and not name.startswith(OPTIONAL)]
    assert dodged == []


@pytest.mark.parametrize("edges, circular", [({"a": {"b"}, "b": {"c"}, "c": set()}, False),
                                              ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
                                              ({"a": {"a"}}, True)])
def test_the_circle_finder_finds_circles(edges, circular):
    assert (find_circle(edges) is not None) == circular


def test_the_graph_sees_module_level_imports_of_the_project(tmp_path):
    (tmp_path / "functions").mkdir()
    (tmp_path / "functions" / "__init__.py").write_text("")
    (tmp_path / "functions" / "a.py").write_text("from functions.b import thing\n")
    (tmp_path / "functions" / "b.py").write_text("def thing():\n    from functions import a\n")
    for package in PACKAGES[1:]:
        (tmp_path / package).mkdir()
    for name in TOP_MODULES:
        (tmp_path / f"{name}.py").write_text("")
    graph = import_graph(tmp_path)
    assert graph["functions.a"] == {"functions.b"} and graph["functions.b"] == set()
