"""Loading the golden fixtures written from MocoSFL's own code (benchmarks/golden/): skip when one is absent."""
from __future__ import annotations

import json
from typing import Any

import pytest
from paths import MOCOSFL_FIXTURES


def load_fixture(name: str, with_tensors: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(values, tensors) of tests/fixtures/mocosfl/<name>.json and .pt; the test skips when a file is missing."""
    values_path, tensors_path = MOCOSFL_FIXTURES / f"{name}.json", MOCOSFL_FIXTURES / f"{name}.pt"
    if not values_path.is_file() or (with_tensors and not tensors_path.is_file()):
        pytest.skip(f"golden fixture {name} not found; write it with python benchmarks/golden/{name}.py "
                    f"--peer_dir <MocoSFL checkout>")
    values = json.loads(values_path.read_text(encoding="utf-8"))
    tensors = None
    if with_tensors:
        import torch

        tensors = torch.load(tensors_path, map_location="cpu", weights_only=True)
    return values, tensors
