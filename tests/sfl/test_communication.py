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
from functions.core.errors import UserError
from functions.data.layout import StepLayout
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


# Two clients sharing 64 synthetic images, 16 rows each a step: short epochs (what these tests count is epochs).
SMALL_EPOCHS = ("--num_client", "2", "--data_proportion", "0.125", "--batch_size", "16")


def _server_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.method.server.state_dict().items()}


@pytest.mark.parametrize("make, engine", [(moco_trainer, "vmap"), (moco_trainer, "loop"), (swav_trainer, "vmap")])
def test_upload_only_and_replay_epochs_leave_the_clients_unchanged_and_train_the_server(tmp_path, monkeypatch, make,
                                                                                       engine):
    monkeypatch.setattr(communication, "WARMUP_EPOCHS", 0)
    # After the first epoch (no loss to compare with yet) each epoch's loss falls by less than this threshold:
    # A, A, then B, then C (replaying the B epoch's smashed data).
    trainer = make(tmp_path, *SMALL_EPOCHS, "--num_epoch", "4", "--loss_threshold", "100", "--client_exec", engine)
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
    trainer = moco_trainer(tmp_path, *SMALL_EPOCHS, "--num_epoch", "3")
    assert trainer.communication is None
    for _ in range(3):
        clients = client_weights(trainer)
        trainer.train_epoch()
        assert weights_changed(clients, client_weights(trainer))


def test_communication_saving_resumes_in_its_status(tmp_path, monkeypatch):
    monkeypatch.setattr(communication, "WARMUP_EPOCHS", 0)
    trainer = moco_trainer(tmp_path, *SMALL_EPOCHS, "--num_epoch", "4", "--loss_threshold", "100")
    for _ in range(3):
        trainer.train_epoch()
    state = trainer.state_dict()
    resumed = moco_trainer(tmp_path / "again", *SMALL_EPOCHS, "--num_epoch", "4", "--loss_threshold", "100")
    resumed.communication.folder = trainer.communication.folder
    resumed.load_state_dict(state)
    assert resumed.communication.status == REPLAY and resumed.communication.bytes_saved > 0


# ------------------------------------------------------------------------------- the replay files
ROW_SHAPES = ([(4, 2, 2)], [(4, 2, 2)])  # one trainable crop, one momentum crop of 4 x 2 x 2 smashed data


class BuildsAnything:
    """Unpickling this would call print: a crafted file asks for a global the safe load refuses."""

    def __reduce__(self):
        return print, ("ran",)


def _saving(folder: Path) -> CommunicationSaving:
    return CommunicationSaving(1.0, folder, Runtime(device=torch.device("cpu")), num_client=2,
                               row_shapes=lambda: ROW_SHAPES)


def _keep_step_0(saving: CommunicationSaving) -> None:
    saving.keep(0, [torch.ones(5, 4, 2, 2)], [torch.zeros(5, 4, 2, 2)], StepLayout.of([0, 1], [2, 3]), 1.0)


def test_a_kept_step_replays_as_it_was_written(tmp_path):
    saving = _saving(tmp_path / "replay_tensors")
    _keep_step_0(saving)
    inputs, momentum, layout, share = saving.replayed(0, torch.device("cpu"))
    assert torch.equal(inputs[0], torch.ones(5, 4, 2, 2)) and torch.equal(momentum[0], torch.zeros(5, 4, 2, 2))
    assert layout == StepLayout.of([0, 1], [2, 3]) and share == 1.0
    assert [p.name for p in (tmp_path / "replay_tensors").iterdir()] == ["rank0_step0.pt"]  # no temporary left


@pytest.mark.parametrize("damage, fragment", [
    ("truncated", "Error): it is not what this run kept"),
    ("crafted", "(UnpicklingError)"),
    ("not_a_step", "it is not the smashed data of a step"),
    ("wrong_shape", "its inputs have shape (5, 8, 2, 2), expected (5, 4, 2, 2)"),
    ("wrong_layout", "its layout names clients beyond this run's 2"),
    ("integer_rows", "its momentum are not floating-point tensors"),
    ("link", "(OSError)"),
])
def test_a_damaged_replay_file_is_one_line_naming_it(tmp_path, damage, fragment):
    saving = _saving(tmp_path / "replay_tensors")
    _keep_step_0(saving)
    path = tmp_path / "replay_tensors" / "rank0_step0.pt"
    kept = torch.load(path, weights_only=True)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "crafted":
        torch.save({"inputs": BuildsAnything()}, path)
    elif damage == "not_a_step":
        torch.save([torch.ones(2)], path)
    elif damage == "link":
        outside = tmp_path / "elsewhere.pt"
        path.rename(outside)
        path.symlink_to(outside)
    else:
        if damage == "wrong_shape":
            kept["inputs"] = [torch.ones(5, 8, 2, 2)]
        elif damage == "wrong_layout":
            kept["layout"] = [[0, 7], [2, 3], [0, 7], [2, 3]]
        else:
            kept["momentum"] = [torch.zeros(5, 4, 2, 2, dtype=torch.int64)]
        torch.save(kept, path)
    with pytest.raises(UserError, match="--loss_threshold: cannot replay") as refused:
        saving.replayed(0, torch.device("cpu"))
    assert str(path) in str(refused.value) and fragment in str(refused.value)


def test_replay_files_are_never_written_through_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "replay_tensors").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="replay_tensors is a symbolic link"):
        _keep_step_0(_saving(run_dir / "replay_tensors"))
    assert not any(outside.iterdir())
    # A link in place of a file is replaced by the file; what it pointed to stays as it was.
    (run_dir / "replay_tensors").unlink()
    (run_dir / "replay_tensors").mkdir()
    target = outside / "target.pt"
    target.write_bytes(b"someone else's file")
    (run_dir / "replay_tensors" / "rank0_step0.pt").symlink_to(target)
    _keep_step_0(_saving(run_dir / "replay_tensors"))
    assert target.read_bytes() == b"someone else's file"
    assert not (run_dir / "replay_tensors" / "rank0_step0.pt").is_symlink()


def test_a_replay_folder_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "replay_tensors").write_text("a file where the folder should be")
    with pytest.raises(UserError, match="--loss_threshold: cannot write .*replay_tensors"):
        _keep_step_0(_saving(tmp_path / "replay_tensors"))
