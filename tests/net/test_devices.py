"""Real clients as separate processes on 127.0.0.1 with mutual TLS: the same numbers as the simulated run (MoCo and
SwAV, across a FedAvg and a resume), and a killed device left out, then back (restarted as the real command)."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from device_processes import DeviceProcess
from device_runs import DEVICE_TIMEOUT_S, RunLines, small_trainer
from torchrun_runs import tensors

from functions.core.checkpoint import CHECKPOINT_NAME, load_checkpoint
from functions.core.errors import TrainingInterrupted


def final_state(trainer) -> dict[str, torch.Tensor]:
    """Every client's and the server's weights and optimizer state, by a flat name."""
    state = {"clients": trainer.clients.state_dict(), "method": trainer.method.state_dict(),
             "server_optimizer": trainer.split_step.server_optimizer.state_dict()}
    return dict(tensors(state))


def stop_after_step(trainer, step: int) -> None:
    """A stop signal right after global step `step` (its FedAvg done), as SIGTERM gives it."""
    fedavg = trainer.fedavg

    def fedavg_then_stop(pool):
        fedavg(pool)
        if trainer.global_step == step:
            trainer.stop.request(signal.SIGTERM)

    trainer.fedavg = fedavg_then_stop


@pytest.mark.parametrize("method", ["moco", "swav"])
def test_remote_clients_give_the_simulated_runs_numbers(method: str, tmp_path: Path, certs: Path) -> None:
    reference = small_trainer(method, tmp_path / "simulated")
    reference.train()
    expected_losses, expected_state = reference.log.metrics.data["train_loss"], final_state(reference)
    reference.close()

    network = ["--remote_clients", "2", "--credentials", str(certs), "--join_timeout", "60"]
    first = small_trainer(method, tmp_path / "networked", *network, "--listen", "127.0.0.1:0")
    port = first.remote.server.port
    devices = [DeviceProcess(port, client, certs, tmp_path / f"device-{client}.log") for client in (2, 3)]
    try:
        stop_after_step(first, 2)
        with pytest.raises(TrainingInterrupted):
            first.train()
        first.close()  # stopped by a signal: the devices keep waiting for the resumed run
        assert all(device.running() for device in devices)
        resumed = small_trainer(method, tmp_path / "networked", *network, "--listen", f"127.0.0.1:{port}")
        resumed.load_state_dict(load_checkpoint(tmp_path / "networked" / CHECKPOINT_NAME))
        resumed.train()
        losses, state = resumed.log.metrics.data["train_loss"], final_state(resumed)
        resumed.close()
        exits = [device.wait(DEVICE_TIMEOUT_S) for device in devices]
        assert exits == [0, 0], [device.lines() for device in devices]
    finally:
        for device in devices:
            device.kill()
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([v for _, v in losses]), torch.tensor([v for _, v in expected_losses]),
                               rtol=1e-6, atol=1e-7)
    assert state.keys() == expected_state.keys()
    for name, value in expected_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    costs = resumed.log.metrics.data
    assert [step for step, _ in costs["device/3/bytes_up"]][-2:] == [3, 4]
    assert all(value > 0 for _, value in costs["device/2/round_trip_s"])


def test_a_killed_device_is_left_out_and_rejoins(tmp_path: Path, certs: Path) -> None:
    trainer = small_trainer("moco", tmp_path / "run", "--remote_clients", "1", "--credentials", str(certs),
                            "--listen", "127.0.0.1:0", "--client_timeout", "1", "--join_timeout", "60")
    port, remote = trainer.remote.server.port, trainer.remote
    devices = [DeviceProcess(port, 3, certs, tmp_path / "device.log")]
    gather = remote.gather

    def gather_with_faults(batch, epoch, step, global_step, pool):
        if global_step == 1:  # before step 2: the device dies
            devices[0].kill()
        if global_step == 2:  # before step 3, after the FedAvg without it: the device command for the same client
            devices.append(DeviceProcess(port, 3, certs, tmp_path / "restarted.log", command=True))
            deadline = time.monotonic() + DEVICE_TIMEOUT_S
            while not remote.server.connected(3) and time.monotonic() < deadline:
                remote.serve_joins()  # what the next step does first; here until the device is ready
                time.sleep(0.05)
        return gather(batch, epoch, step, global_step, pool)

    remote.gather = gather_with_faults
    try:
        with RunLines() as lines:
            trainer.train()
            trainer.close()
        assert devices[1].wait(DEVICE_TIMEOUT_S) == 0, devices[1].lines()
    finally:
        for device in devices:
            device.kill()
    assert trainer.global_step == 4
    left_out = [line for line in lines.lines if line.startswith("client 3 left out")]
    assert left_out == ["client 3 left out of step 2: no answer within --client_timeout"], lines.lines
    assert any(line.startswith("FedAvg of step 2 without remote clients [3]") for line in lines.lines), lines.lines
    trained = [step for step, _ in trainer.log.metrics.data["device/3/bytes_up"] if _ > 0]
    assert 1 in trained and 2 not in trained and {3, 4} <= set(trained)
