"""Shared test fixtures: locations of real data, CPU-only defaults."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core (pytest.ini): each keeps to one thread, set before torch is first imported, and so do the
    # programs the tests start.
    os.environ["OMP_NUM_THREADS"] = "1"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Real CIFAR-10 images (a trimmed official layout) kept beside the repository; override with SFL_CIFAR10_MINI.
CIFAR10_MINI = Path(os.environ.get("SFL_CIFAR10_MINI", REPO_ROOT.parent / "shared" / "data" / "cifar10-mini"))


@pytest.fixture
def cifar10_mini_dir() -> Path:
    """The folder that holds cifar-10-batches-py/ with real images; skips the test when absent."""
    if not (CIFAR10_MINI / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 sample not found at {CIFAR10_MINI}")
    return CIFAR10_MINI


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast and does not stall on a busy machine's OpenMP barriers (test modules
    ask for it with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
