"""--loss_threshold against MocoSFL's own loss_based_status (tests/fixtures/mocosfl/communication.json, written by
benchmarks/golden/communication.py): the status of every epoch on fixed loss sequences, and the saving counted
over the epochs' statuses (default) or as MocoSFL's code counts it (--compat mocosfl)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from functions.core.distributed import Runtime
from functions.sfl.communication import REPLAY, UPLOAD_ONLY, CommunicationSaving

FIXTURE = Path(__file__).parent / "fixtures" / "mocosfl" / "communication.json"
GOLDEN = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else None
pytestmark = pytest.mark.skipif(GOLDEN is None, reason="tests/fixtures/mocosfl/communication.json is absent")
SEQUENCES = ["plateau_then_drop", "flat", "alternating"]


def _replay(tmp_path: Path, name: str, count_next_status: bool) -> tuple[list[str], CommunicationSaving, dict]:
    """This project's CommunicationSaving fed the sequence's epoch losses: (statuses of the epochs, it, metrics)."""
    saving = CommunicationSaving(GOLDEN["threshold"], tmp_path, Runtime(device=torch.device("cpu")),
                                 count_next_status=count_next_status)
    metrics: dict[str, list] = {}
    log = SimpleNamespace(metrics=SimpleNamespace(append=lambda key, epoch, value: metrics.setdefault(key, []).append(
        (epoch, value))))
    statuses = []
    losses = GOLDEN[name]["losses"]
    for epoch, loss in enumerate(losses):
        statuses.append(saving.status)
        saving.end_epoch(epoch, loss, log, len(losses))
    return statuses, saving, metrics


@pytest.mark.parametrize("name", SEQUENCES)
def test_each_epochs_status_is_mocosfls(tmp_path, name):
    statuses, saving, metrics = _replay(tmp_path, name, count_next_status=False)
    assert statuses == GOLDEN[name]["statuses"]
    assert saving.status == GOLDEN[name]["status_after_last"]
    assert [value for _, value in metrics["communication_status"]] == ["ABC".index(s) for s in statuses]


@pytest.mark.parametrize("name", SEQUENCES)
def test_the_saving_counts_the_statuses_the_epochs_trained_in(tmp_path, name):
    _, saving, metrics = _replay(tmp_path, name, count_next_status=False)
    golden = GOLDEN[name]["statuses"]
    assert saving.epochs == {status: golden.count(status) for status in "ABC"}
    assert saving.saved_epochs == golden.count(REPLAY) + golden.count(UPLOAD_ONLY) / 2
    assert metrics["communication_epochs_saved"][-1][1] == saving.saved_epochs
    # MocoSFL's count is off by the status after the last epoch and the first epoch's A (an epoch more or less).
    assert saving.saved_epochs != GOLDEN[name]["saving"]


@pytest.mark.parametrize("name", SEQUENCES)
def test_compat_counts_as_mocosfls_code(tmp_path, name):
    statuses, saving, _ = _replay(tmp_path, name, count_next_status=True)
    assert statuses == GOLDEN[name]["statuses"]  # the statuses themselves do not change
    assert saving.epochs == GOLDEN[name]["epoch_recording"]
    assert saving.saved_epochs == GOLDEN[name]["saving"]


def test_compat_switch_reaches_the_trainer(tmp_path):
    from sfl_helpers import moco_trainer

    default = moco_trainer(tmp_path / "default", "--num_client", "2", "--loss_threshold", "0.1")
    compat = moco_trainer(tmp_path / "compat", "--num_client", "2", "--loss_threshold", "0.1", "--compat", "mocosfl")
    assert not default.communication.count_next_status and compat.communication.count_next_status
