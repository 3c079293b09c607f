"""Learning rates against MocoSFL's own schedulers (tests/fixtures/mocosfl/schedules.json, written by
benchmarks/golden/schedules.py): the server's and the clients' rates per epoch by default, and with
--compat mocosfl the clients' rates as MocoSFL's loop steps them (once per client step)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from paths import MOCOSFL_FIXTURES
from sfl_helpers import moco_trainer

from configs import parse_args
from functions.methods.schedules import LearningRateSchedule
from functions.sfl.clients.stacked_sgd import StackedSGD

FIXTURE = MOCOSFL_FIXTURES / "schedules.json"
GOLDEN = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else None
pytestmark = pytest.mark.skipif(GOLDEN is None, reason="tests/fixtures/mocosfl/schedules.json is absent")
# The rates are float64 on both sides; MocoSFL's cosine is torch's recursive form, the closed form here differs
# from it by rounding only (under 3e-13 over 20000 steps).
TOLERANCE = 1e-12
# MocoSFL option -> this project's: the steps per epoch follow from 512 synthetic images over the pool's rows.
PROJECT_OPTIONS = {
    "v2_cos": ["--num_client", "2", "--batch_size", "100"],
    "v1_multistep": ["--num_client", "2", "--batch_size", "100"],
    "v1_multistep_10": ["--num_client", "1", "--batch_size", "256"],
    "v2_sampled": ["--num_client", "4", "--batch_size", "128"],
    "v2_statuses": ["--num_client", "2", "--batch_size", "128"],
}


def _options(name: str) -> list[str]:
    """The setting's MocoSFL options that this project shares (--num_client is set per setting)."""
    options, kept = GOLDEN[name]["options"], []
    for flag, value in zip(options[::2], options[1::2]):
        if flag in ("--moco_version", "--num_epoch", "--lr", "--c_lr", "--client_sample_ratio", "--loss_threshold"):
            kept += [flag, value]
    return kept


def _run_rates(tmp_path: Path, monkeypatch, name: str, *extra: str) -> tuple[list[list[float]], list[float]]:
    """The rates this project's loop sets at every step of the setting (each client's) and per epoch (server's),
    with the steps themselves skipped; pools and communication statuses as in the setting."""
    golden = GOLDEN[name]["as_run"]
    trainer = moco_trainer(tmp_path, *_options(name), *PROJECT_OPTIONS[name], *extra)
    assert trainer.steps_per_epoch == golden["steps_per_epoch"]
    monkeypatch.setattr(trainer, "train_step", lambda batch: (torch.tensor(1.0), {}))
    monkeypatch.setattr(trainer.data.loaders.train, "epoch", lambda epoch, start_step=0, clients=None: iter(
        [_NoBatch()] * (trainer.steps_per_epoch - start_step)))
    monkeypatch.setattr(trainer, "replay_step", lambda step: (torch.tensor(1.0), {}, 1.0))
    monkeypatch.setattr(trainer, "fedavg", lambda pool: None)
    if golden["pools"] is not None:
        monkeypatch.setattr(trainer.data, "pool", lambda epoch: list(golden["pools"][epoch]))
    if trainer.communication is not None:
        monkeypatch.setattr(trainer.communication, "end_epoch", lambda *args, **kwargs: None)
        monkeypatch.setattr(trainer.communication, "replay_order", lambda steps, seed, epoch: list(range(steps)))
    client_rates: list[list[float]] = []
    server_rates: list[float] = []
    set_rates = trainer.split_step.set_learning_rates

    def record(server_lr, client_lr):
        set_rates(server_lr, client_lr)
        rates = [client_lr] * trainer.args.num_client if isinstance(client_lr, float) else list(client_lr)
        client_rates.append(rates)
        server_rates.append(server_lr)

    monkeypatch.setattr(trainer.split_step, "set_learning_rates", record)
    per_step: list[list[float]] = []
    per_epoch: list[float] = []
    for epoch in range(golden["num_epoch"]):
        if golden["statuses"] is not None:
            trainer.communication.status = golden["statuses"][epoch]
        trainer.train_epoch()
        # Rates set once per epoch (the default) hold for all its steps.
        per_step += client_rates + [client_rates[-1]] * (golden["steps_per_epoch"] - len(client_rates))
        per_epoch.append(server_rates[0])
        assert all(rate == server_rates[0] for rate in server_rates)
        client_rates.clear()
        server_rates.clear()
    return per_step, per_epoch


class _NoBatch:
    """Stands for a step's batch where the step itself is skipped."""

    def to(self, device):
        return self


@pytest.mark.parametrize("name", ["v2_cos", "v1_multistep", "v1_multistep_10", "v2_statuses"])
def test_default_rates_are_mocosfls_schedulers_stepped_once_per_epoch(tmp_path, monkeypatch, name):
    client_rates, server_rates = _run_rates(tmp_path, monkeypatch, name)
    golden, steps = GOLDEN[name], GOLDEN[name]["as_run"]["steps_per_epoch"]
    assert server_rates == pytest.approx(golden["as_run"]["server_lr"], abs=TOLERANCE)
    assert server_rates == pytest.approx(golden["per_epoch"]["server_lr"], abs=TOLERANCE)
    expected = [rate for rate in golden["per_epoch"]["client_lr"] for _ in range(steps)]
    assert [rates[0] for rates in client_rates] == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("name", list(PROJECT_OPTIONS))
def test_compat_client_rates_follow_mocosfls_per_client_step_scheduler(tmp_path, monkeypatch, name):
    client_rates, server_rates = _run_rates(tmp_path, monkeypatch, name, "--compat", "mocosfl")
    golden = GOLDEN[name]["as_run"]
    if golden["pools"] is None:
        # With client sampling MocoSFL's epochs are int(1 / ratio) times shorter than these (its server cosine
        # takes as many more, smaller steps): only the clients' rates, counted in client steps, compare.
        assert server_rates == pytest.approx(golden["server_lr"], abs=TOLERANCE)
    assert len(client_rates) == len(golden["client_lr"])
    for step, (ours, theirs) in enumerate(zip(client_rates, golden["client_lr"])):
        assert ours == pytest.approx(theirs, abs=TOLERANCE), f"step {step}"


def test_a_given_milestone_list_wins_and_an_empty_one_keeps_the_rate():
    given = LearningRateSchedule(parse_args("moco", ["--moco_version", "V1", "--milestones", "2"]), 10)
    assert given.milestones == [2] and given.rates(2, 0) == pytest.approx((0.006, 0.012))
    constant = LearningRateSchedule(parse_args("moco", ["--moco_version", "V1", "--milestones"]), 10)
    assert constant.rates(199, 0) == pytest.approx((0.06, 0.06)) and not constant.depends_on_num_epoch
    swav = parse_args("swav", ["--num_epoch", "10"])
    from functions.methods.swav import SwavServer
    assert SwavServer.learning_rate_schedule(swav, 10).rates(9, 0) == pytest.approx((swav.lr, swav.c_lr))


def test_per_client_rates_reach_each_clients_update():
    torch.manual_seed(0)
    weights = torch.randn(3, 4, requires_grad=True)
    weights.grad = torch.randn(3, 4)
    optimizer = StackedSGD([weights], lr=1.0, momentum=0.9, weight_decay=5e-4)
    optimizer.pool_index = torch.tensor([0, 2])
    optimizer.row_lr = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    before = weights.detach().clone()
    optimizer.step()
    for client, rate in ((0, 0.1), (2, 0.3)):
        single = before[client].clone().requires_grad_(True)
        single.grad = weights.grad[client].clone()
        torch.optim.SGD([single], lr=rate, momentum=0.9, weight_decay=5e-4).step()
        assert torch.allclose(weights[client], single, atol=1e-7)
    assert torch.equal(weights[1], before[1])


@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_compat_rates_reach_the_client_optimizers(tmp_path, engine):
    trainer = moco_trainer(tmp_path, "--num_client", "2", "--compat", "mocosfl", "--client_exec", engine)
    trainer.client_steps[:] = [0, trainer.args.num_epoch]  # client 1 is at the end of its cosine: rate 0
    trainer.set_learning_rates(0, 0)
    if engine == "loop":
        rates = [optimizer.param_groups[0]["lr"] for optimizer in trainer.clients.optimizers]
    else:
        rates = trainer.clients.optimizer.row_lr.tolist()
    assert rates == pytest.approx([trainer.args.c_lr, 0.0], abs=TOLERANCE)


def test_client_step_counts_resume_and_are_derived_for_older_checkpoints(tmp_path):
    options = ["--num_client", "4", "--client_sample_ratio", "0.5", "--compat", "mocosfl"]
    trainer = moco_trainer(tmp_path / "one", *options)
    trainer.epoch, trainer.step_in_epoch = 2, 1
    state = trainer.state_dict()
    state["client_steps"] = [5, 6, 7, 8]
    resumed = moco_trainer(tmp_path / "two", *options)
    resumed.load_state_dict(state)
    assert resumed.client_steps.tolist() == [5, 6, 7, 8]
    del state["client_steps"]  # written before the counts were kept: each pool's steps so far
    resumed.load_state_dict(state)
    expected = [0] * 4
    for epoch, steps in ((0, trainer.steps_per_epoch), (1, trainer.steps_per_epoch), (2, 1)):
        for client in trainer.data.pool(epoch):
            expected[client] += steps
    assert resumed.client_steps.tolist() == expected
