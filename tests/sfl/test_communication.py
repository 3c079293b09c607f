"""--loss_threshold against MocoSFL's own loss_based_status (tests/fixtures/mocosfl/communication.json, written by
benchmarks/golden/communication.py): the status of every epoch on fixed loss sequences, and the saving counted
over the epochs' statuses (default) or as MocoSFL's code counts it (--compat mocosfl)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from paths import MOCOSFL_FIXTURES
from sfl_helpers import client_weights, moco_trainer, swav_trainer, weights_changed

from functions.core.distributed import Runtime
from functions.sfl import communication
from functions.sfl.communication import FULL, REPLAY, UPLOAD_ONLY, CommunicationSaving, next_status

FIXTURE = MOCOSFL_FIXTURES / "communication.json"
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


def test_loss_threshold_statuses_follow_mocosfls_rule():
    threshold = 0.1
    assert next_status(FULL, 5.0, 4.99, threshold, epoch=10) == FULL         # warm-up epochs always communicate
    assert next_status(FULL, 5.0, 4.95, threshold, epoch=11) == UPLOAD_ONLY
    assert next_status(UPLOAD_ONLY, 4.95, 4.9, threshold, epoch=12) == REPLAY
    assert next_status(REPLAY, 4.9, 4.85, threshold, epoch=13) == REPLAY
    assert next_status(REPLAY, 4.9, 4.5, threshold, epoch=14) == FULL        # a fast fall: back to communicating
    assert next_status(UPLOAD_ONLY, 4.9, 5.2, threshold, epoch=14) == REPLAY  # a rise is no fall


def _server_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.method.server.state_dict().items()}


@pytest.mark.parametrize("make, engine", [(moco_trainer, "vmap"), (moco_trainer, "loop"), (swav_trainer, "vmap")])
def test_upload_only_and_replay_epochs_leave_the_clients_unchanged_and_train_the_server(tmp_path, monkeypatch, make,
                                                                                       engine):
    monkeypatch.setattr(communication, "WARMUP_EPOCHS", 0)
    # After the first epoch (no loss to compare with yet) each epoch's loss falls by less than this threshold:
    # A, A, then B, then C (replaying the B epoch's smashed data).
    trainer = make(tmp_path, "--num_client", "2", "--num_epoch", "4", "--loss_threshold", "100", "--client_exec",
                   engine)
    statuses = []
    for _ in range(4):
        clients, server = client_weights(trainer), _server_weights(trainer)
        statuses.append(trainer.communication.status)
        if trainer.communication.replaying:
            monkeypatch.setattr(trainer.data.loaders.train, "epoch", lambda *a, **k: pytest.fail("C read data"))
        trainer.train_epoch()
        assert weights_changed(server, _server_weights(trainer))
        assert weights_changed(clients, client_weights(trainer)) == (statuses[-1] == FULL), statuses
    assert statuses == [FULL, FULL, UPLOAD_ONLY, REPLAY]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [status for _, status in metrics["communication_status"]] == [0, 0, 1, 2]
    saved = [value for _, value in metrics["communication_bytes_saved"]]
    assert saved[1] == 0 < saved[2] < saved[3]
    # C + B / 2 over the statuses the epochs trained in (MocoSFL's own count: tests/sfl/test_communication.py).
    assert metrics["communication_epochs_saved"][-1][1] == statuses.count(REPLAY) + statuses.count(UPLOAD_ONLY) / 2


def test_without_a_loss_threshold_every_epoch_trains_the_clients(tmp_path, monkeypatch):
    monkeypatch.setattr(communication, "WARMUP_EPOCHS", 0)
    trainer = moco_trainer(tmp_path, "--num_client", "2", "--num_epoch", "3")
    assert trainer.communication is None
    for _ in range(3):
        clients = client_weights(trainer)
        trainer.train_epoch()
        assert weights_changed(clients, client_weights(trainer))


def test_communication_saving_resumes_in_its_status(tmp_path, monkeypatch):
    monkeypatch.setattr(communication, "WARMUP_EPOCHS", 0)
    trainer = moco_trainer(tmp_path, "--num_client", "2", "--num_epoch", "4", "--loss_threshold", "100")
    for _ in range(3):
        trainer.train_epoch()
    state = trainer.state_dict()
    resumed = moco_trainer(tmp_path / "again", "--num_client", "2", "--num_epoch", "4", "--loss_threshold", "100")
    resumed.communication.folder = trainer.communication.folder
    resumed.load_state_dict(state)
    assert resumed.communication.status == REPLAY and resumed.communication.bytes_saved > 0
