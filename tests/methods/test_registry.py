"""No code outside a method's own module asks for that method by name: the loop, the options, the models and the
benchmark work for any registered method."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

from paths import REPO_ROOT

from functions.methods.registry import METHODS, method_names

SKIPPED_FOLDERS = {"tests", ".git", "outputs", "data", "__pycache__"}


def _strings_in(node: ast.AST) -> list[str]:
    """String constants of a comparison operand: the constant itself, or the items of a literal tuple/list/set."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [item.value for item in node.elts if isinstance(item, ast.Constant) and isinstance(item.value, str)]
    return []


def method_name_tests(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every comparison, membership test or match case against one of `names` in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        operands: list[ast.AST] = []
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        for operand in operands:
            found.extend((node.lineno, value) for value in _strings_in(operand) if value in names)
    return found


def _project_sources() -> list[Path]:
    return sorted(path for path in REPO_ROOT.rglob("*.py")
                  if not SKIPPED_FOLDERS & set(path.relative_to(REPO_ROOT).parts[:-1]))


def test_the_checker_finds_the_ways_to_test_a_name():
    source = ('if args.method == "moco":\n    pass\n'
              'if "swav" != method:\n    pass\n'
              'if method in ("moco", "other"):\n    pass\n'
              'match method:\n    case "swav":\n        pass\n'
              'if method == "other":\n    pass\n')
    assert method_name_tests(source, {"moco", "swav"}) == [(1, "moco"), (3, "swav"), (5, "moco"), (8, "swav")]


def test_no_file_compares_with_a_method_name_outside_that_methods_module():
    names = set(method_names())
    assert {"moco", "swav"} <= names
    home = {name: Path(inspect.getsourcefile(METHODS[name])).resolve() for name in names}
    sources = _project_sources()
    assert REPO_ROOT / "functions" / "train" / "trainer.py" in sources and REPO_ROOT / "configs" / "__init__.py" in sources
    offending = []
    for path in sources:
        for line, name in method_name_tests(path.read_text(), names):
            if path.resolve() != home[name]:
                offending.append(f"{path.relative_to(REPO_ROOT)}:{line} tests for method {name!r}")
    assert not offending, "\n".join(offending)
