"""Shared test setup: the repository and tests/helpers on the import path, one torch thread, real-data fixtures."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# One thread per test process (pytest-xdist workers share the cores), set before torch is first imported; the
# programs the tests start inherit it. Tiny tensors run as fast on one thread, and in-process and child runs then
# reduce in the same order, so their results match bit for bit.
os.environ["OMP_NUM_THREADS"] = "1"
# glibc hands blocks above its mmap threshold (at most 32 MB) back to the kernel when freed, and every training step
# then faults its activations in again. Served from the heap instead, the heavy tests spend a fraction of the kernel
# time (a few % more peak memory). Set here, before the xdist workers and the programs they start exist.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 << 20))
os.environ.setdefault("MALLOC_TOP_PAD_", str(512 << 20))
HELPERS = Path(__file__).resolve().parent / "helpers"
for folder in (HELPERS.parent.parent, HELPERS):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from paths import CIFAR10_MINI  # noqa: E402  (after the path is set)

from functions.data import partition  # noqa: E402


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """-n auto: one worker more than the cores this process may use. Many tests wait on programs they started
    (torchrun ranks, sweeps, devices, signalled runs); the extra worker keeps both cores busy meanwhile."""
    return len(os.sched_getaffinity(0)) + 1


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "partition_plot: the test reads partition.png, so its runs draw it")


@pytest.fixture(autouse=True)
def no_partition_plot(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs inside a test process do not draw partition.png unless the test reads it (marked partition_plot, or in
    tests/data/test_partition.py, which tests the picture): a drawing costs a fraction of a CPU second, and the suite
    starts hundreds of runs. Runs started as programs draw it as usual."""
    if request.node.get_closest_marker("partition_plot") is None and request.node.path.name != "test_partition.py":
        monkeypatch.setattr(partition, "_plot_partition", lambda *plot: None)


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


# Tests that run several training processes one after another: started first, so that neither core waits for one
# of them at the end of the session (pytest-xdist hands each worker a share of the collected order).
SERIAL_RUNS_FIRST = (
    "tests/train/test_sweep_slurm.py::test_a_slurm_sweep_resubmits_only_what_failed",
    "tests/train/test_sweep.py::test_a_killed_sweep_continues_and_summarises_every_seed",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(SERIAL_RUNS_FIRST))
