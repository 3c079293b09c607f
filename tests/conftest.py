"""Shared test setup: the repository and tests/helpers on the import path, one torch thread, real-data fixtures."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# One thread per test process (pytest-xdist runs one worker per core), set before torch is first imported; the
# programs the tests start inherit it. Tiny tensors run as fast on one thread, and in-process and child runs then
# reduce in the same order, so their results match bit for bit.
os.environ["OMP_NUM_THREADS"] = "1"
HELPERS = Path(__file__).resolve().parent / "helpers"
for folder in (HELPERS.parent.parent, HELPERS):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from paths import CIFAR10_MINI  # noqa: E402  (after the path is set)


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


# Tests that take ten seconds or more on one core (measured with --durations), slowest first. pytest-xdist hands
# each worker a contiguous half of the collection and lets an idle worker take the tail of another's queue: these
# are dealt alternately to the start of each half, so neither worker is left with a long test at the end.
SLOW_TESTS = (
    "tests/configs/test_reference_scripts.py::test_the_line_trains_two_steps",
    "tests/train/test_learning.py::test_sflswav_leaves_ln_k_without_collapse_on_real_images",
    "tests/train/test_sweep.py::test_a_killed_sweep_continues_and_summarises_every_seed",
    "tests/core/test_distributed.py::test_resume_under_torchrun_continues_the_run",
    "tests/train/test_trainer.py::test_compiled_server_trains_like_the_plain_one",
    "tests/evaluation/test_mocosfl.py::test_both_protocols_on_cifar10_mini",
    "tests/core/test_distributed.py::test_resume_across_nodes_without_a_shared_disk_takes_rank_zeros_checkpoint",
    "tests/core/test_distributed.py::test_two_processes_save_communication_like_one_process",
    "tests/core/test_distributed.py::test_two_processes_train_moco_like_one_process",
    "tests/train/test_learning.py::test_sflmoco_lowers_the_loss_on_real_images",
    "tests/core/test_distributed.py::test_two_processes_train_swav_like_one_process",
    "tests/sfl/test_communication.py::test_upload_only_and_replay_epochs_leave_the_clients_unchanged_and_train_the",
    "tests/core/test_distributed.py::test_two_processes_train_mocosfl_symmetric_with_client_queues_like_one_process",
    "tests/methods/test_contract.py::test_a_method_from_the_docstring_trains_under_torchrun_as_in_one_process",
    "tests/core/test_distributed.py::test_two_processes_train_fl_moco_like_one_process",
    "tests/methods/test_moco.py::test_the_best_knn_epoch_is_kept_in_checkpoint_best",
    "tests/core/test_distributed.py::test_two_processes_run_divergence_aware_fedavg_like_one_process",
    "tests/core/test_distributed.py::test_a_full_disk_on_rank_zero_during_training_stops_every_rank_with_its_one_line",
    "tests/sfl/test_communication.py::test_without_a_loss_threshold_every_epoch_trains_the_clients",
    "tests/core/test_distributed.py::test_sigterm_to_torchrun_saves_once_and_prints_the_torchrun_resume_command",
    "tests/train/test_stopping.py::test_sigterm_mid_epoch_saves_and_the_printed_resume_reaches_the_uninterrupted_we",
)


def _slowness(item: pytest.Item) -> int | None:
    """The rank of a test in SLOW_TESTS (0 = slowest), None for the others."""
    for rank, prefix in enumerate(SLOW_TESTS):
        if item.nodeid.startswith(prefix):
            return rank
    return None


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, start each worker's half of the collection with its share of the slow tests."""
    if not hasattr(config, "workerinput"):  # not a pytest-xdist worker
        return
    slow = sorted((item for item in items if _slowness(item) is not None), key=_slowness)
    fast = [item for item in items if _slowness(item) is None]
    first_slow, second_slow = slow[0::2], slow[1::2]
    first_fast = fast[:max(0, len(items) // 2 - len(first_slow))]
    items[:] = first_slow + first_fast + second_slow + fast[len(first_fast):]
