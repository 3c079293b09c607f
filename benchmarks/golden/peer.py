"""Import MocoSFL from a checkout in this process, patched only as far as a CPU needs; write fixture files.

Only the standard library and torch are imported at module level: a part's process must not hold this project's
`functions`, `models` or `configs` packages, whose names MocoSFL's own packages share.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "mocosfl"


def import_mocosfl(peer_dir: str | Path) -> Path:
    """Put the MocoSFL checkout first on sys.path, forget this project's packages, make `.cuda()` a no-op."""
    import torch
    from torch import nn

    peer = Path(peer_dir).resolve()
    if not (peer / "run_sflmoco.py").is_file() or not (peer / "functions" / "sflmoco_functions.py").is_file():
        raise SystemExit(f"error: {peer} is not a MocoSFL checkout (run_sflmoco.py, functions/ expected)")
    for name in list(sys.modules):
        if name.split(".")[0] in ("functions", "models", "configs", "utils", "datasets"):
            del sys.modules[name]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO_ROOT]
    sys.path.insert(0, str(peer))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    return peer


def peer_commit(peer_dir: str | Path) -> str:
    """The git commit of the MocoSFL checkout (recorded in every fixture)."""
    try:
        return subprocess.run(["git", "-C", str(peer_dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_fixture(name: str, peer_dir: str | Path, values: dict[str, Any], tensors: dict[str, Any] | None = None) -> None:
    """tests/fixtures/mocosfl/<name>.json (numbers, lists) and, with tensors, <name>.pt; both name the commit."""
    import torch

    FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    record = {"mocosfl_commit": peer_commit(peer_dir), "generator": f"benchmarks/golden/{name}.py", **values}
    (FIXTURE_DIR / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if tensors is not None:
        torch.save({"mocosfl_commit": record["mocosfl_commit"], **tensors}, FIXTURE_DIR / f"{name}.pt")


def scale_resnet_width(resnet_module: Any, width: int) -> None:
    """Have MocoSFL's resnet module build its GroupNorm stem and basic blocks `width` wide instead of 64 wide."""
    block_init, stem_init = resnet_module.BasicBlock_gn.__init__, resnet_module.conv3x3_gn.__init__

    def block(self: Any, in_planes: int, planes: int, *args: Any, **kwargs: Any) -> None:
        block_init(self, in_planes * width // 64, planes * width // 64, *args, **kwargs)

    def stem(self: Any, in_planes: int, planes: int, *args: Any, **kwargs: Any) -> None:
        stem_init(self, in_planes, planes * width // 64, *args, **kwargs)

    # Wrapped in place: MocoSFL's super(Class, self) calls look the class names up in the module.
    resnet_module.BasicBlock_gn.__init__, resnet_module.conv3x3_gn.__init__ = block, stem
