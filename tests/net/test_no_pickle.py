"""Nothing the network modules run on what they receive can execute code: no pickle (or marshal, shelve, eval,
exec), no torch.load without weights_only=True, no numpy load with allow_pickle."""
from __future__ import annotations

import ast

from paths import REPO_ROOT

NETWORK_PACKAGES = ("functions/net", "functions/device")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
UNSAFE_CALLS = {"eval", "exec", "loads", "__import__"}


def unsafe_uses(source: str) -> list[str]:
    """Every unsafe import or call of a module's source, as "line: what"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{node.lineno}: from {node.module} import")
        elif isinstance(node, ast.Call):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            owner = ast.unparse(function.value) if isinstance(function, ast.Attribute) else ""
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name in ("load", "loads") and owner in ("torch", "np", "numpy", "pickle", "marshal"):
                if owner == "torch" and keywords.get("weights_only") == "True":
                    continue
                if owner in ("np", "numpy") and keywords.get("allow_pickle") != "True":
                    continue
                found.append(f"{node.lineno}: {owner}.{name}")
            elif name in UNSAFE_CALLS and owner in ("", "builtins"):
                found.append(f"{node.lineno}: {name}()")
            elif name == "load" and owner == "" and "weights_only" not in keywords:
                found.append(f"{node.lineno}: load() (a torch.load imported by name?)")
    return found


def test_the_network_modules_never_unpickle() -> None:
    files = [path for package in NETWORK_PACKAGES for path in sorted((REPO_ROOT / package).glob("*.py"))]
    assert len(files) >= 6
    problems = [f"{path.relative_to(REPO_ROOT)}:{use}" for path in files for use in unsafe_uses(path.read_text())]
    assert not problems, problems


def test_the_scan_finds_what_it_looks_for() -> None:
    source = ("import pickle\nfrom marshal import loads\nimport torch\ntorch.load(f)\ntorch.load(f, weights_only=True)\n"
              "np.load(f, allow_pickle=True)\neval('1')\n")
    assert [use.split(":")[0] for use in unsafe_uses(source)] == ["1", "2", "4", "6", "7"]
