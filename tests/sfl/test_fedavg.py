"""FedAvg and divergence-aware FedAvg against MocoSFL's own base_simulator.fedavg (tests/fixtures/mocosfl/
divergence.json and .pt, written by benchmarks/golden/divergence.py) on four tiny clients with fixed weights.

By default the rule MocoSFL's code means ("intended": its mix taking effect; one mu per client from the summed
divergence); with --compat mocosfl its code as it runs ("as_run": the pool's clients keep their own weights, only
the first client's lambda is rescaled, client 0 averaged in place of the pool's first client)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from paths import MOCOSFL_FIXTURES
from sfl_helpers import moco_trainer, swav_trainer, three_different_clients
from torch import nn

from functions.core.distributed import Runtime
from functions.sfl.clients.loop import ClientSide
from functions.sfl.fedavg import fedavg, fedavg_positions
from functions.sfl.fedavg_rules import DivergenceAwareAveraging, FedAvgOptions

FIXTURES = MOCOSFL_FIXTURES
HAVE = (FIXTURES / "divergence.json").is_file() and (FIXTURES / "divergence.pt").is_file()
GOLDEN = json.loads((FIXTURES / "divergence.json").read_text()) if HAVE else None
TENSORS = torch.load(FIXTURES / "divergence.pt", weights_only=True) if HAVE else None
pytestmark = pytest.mark.skipif(not HAVE, reason="tests/fixtures/mocosfl/divergence.* are absent")
CPU = Runtime(device=torch.device("cpu"))
# MocoSFL sums its average in float32 client by client and takes float32 norms; this project averages in float64.
# On weights of about 1 the two differ by a few float32 roundings.
ATOL = 2e-6


class _Clients:
    """A client engine's averaging interface over stacked per-client tensors."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.weights, offset = {}, 0
        for name, shape in GOLDEN["state_layout"]:
            size = math.prod(shape)
            self.weights[name] = flat[:, offset:offset + size].reshape(flat.shape[0], *shape).clone()
            offset += size

    def flat(self) -> torch.Tensor:
        return torch.cat([value.flatten(1) for value in self.weights.values()], dim=1)

    def stacked_state(self, client_ids, momentum_copies=False):
        return {name: value[list(client_ids)].clone() for name, value in self.weights.items()}

    def set_every_client(self, state, momentum_copies=False):
        for name, value in state.items():
            self.weights[name][:] = value

    def set_clients(self, client_ids, stacked):
        for name, value in stacked.items():
            self.weights[name][list(client_ids)] = value


def _run(case: str, compat: bool, sizes: list[int], aware: bool = True):
    """This project's FedAvg over the case's calls (weights set as MocoSFL's were before each call)."""
    golden, tensors = GOLDEN[case], TENSORS[case]
    options = FedAvgOptions(GOLDEN["num_client"], golden["div_lambda"], compat="mocosfl" if compat else "none")
    mixer = DivergenceAwareAveraging(options) if aware else None
    clients, results = None, []
    for call, pool in enumerate(golden["pools"]):
        if clients is None:
            clients = _Clients(tensors["before"][0])
        else:  # MocoSFL's clients moved between the calls by these steps (the golden's "before" of the next call)
            moved = tensors["before"][call] - tensors["after"][call - 1]
            clients = _Clients(clients.flat() + moved)
        divergences = fedavg(clients, pool, sizes, CPU, rule=mixer, measure=True, mocosfl_compat=compat)
        results.append((clients.flat().clone(), divergences, None if mixer is None else mixer.lambdas.clone()))
    return results


@pytest.mark.parametrize("case", ["aware_full_l0.05", "aware_full_l1", "aware_with_client0_l1"])
def test_default_is_mocosfls_intended_rule_one_mu_per_client(case):
    golden, tensors = GOLDEN[f"{case}/intended"], TENSORS[f"{case}/intended"]
    (weights, divergences, lambdas), *later = _run(f"{case}/intended", compat=False, sizes=[1, 1, 1, 1])
    assert torch.allclose(weights, tensors["after"][0], atol=ATOL)
    assert divergences == pytest.approx(golden["calls"][0]["divergences"], rel=1e-5)
    # FedEMA's auto-scaler for every client at its first aggregation (MocoSFL's code: its first client only, whose
    # lambda is the same): lambda = min(lambda * divergence, 1) / divergence.
    first = golden["pools"][0][0]
    assert float(lambdas[first]) == pytest.approx(golden["calls"][0]["div_lambda"][first], rel=1e-5)
    for client, divergence in zip(golden["pools"][0], golden["calls"][0]["divergences"]):
        expected = min(golden["div_lambda"] * divergence, 1.0) / divergence
        assert float(lambdas[client]) == pytest.approx(expected, rel=1e-5)


def test_default_differs_from_a_mu_per_layer():
    """The summed divergence gives one mu per client: mixing each layer by its own divergence gives other weights."""
    golden = TENSORS["aware_full_l1/intended"]
    weights = _run("aware_full_l1/intended", compat=False, sizes=[1, 1, 1, 1])[0][0]
    assert torch.allclose(weights, golden["after"][0], atol=ATOL)
    clients = _Clients(golden["before"][0])
    average = {name: value.mean(dim=0) for name, value in clients.weights.items()}
    per_layer = {}
    for name, rows in clients.weights.items():
        mu = (rows - average[name]).flatten(1).norm(dim=1).clamp(max=1.0).view(-1, *([1] * (rows.dim() - 1)))
        per_layer[name] = mu * rows + (1 - mu) * average[name]
    assert (torch.cat([v.flatten(1) for v in per_layer.values()], 1) - weights).abs().max() > 1e-2


@pytest.mark.parametrize("case", ["aware_full_l0.05", "aware_full_l1", "aware_sampled_l0.05", "aware_sampled_l1",
                                  "aware_with_client0_l1"])
def test_compat_is_mocosfls_code_as_it_runs(case):
    golden, tensors = GOLDEN[f"{case}/as_run"], TENSORS[f"{case}/as_run"]
    # MocoSFL averages with equal weights: the clients' data sizes change nothing under --compat mocosfl.
    for call, (weights, divergences, lambdas) in enumerate(_run(f"{case}/as_run", compat=True, sizes=[1, 2, 3, 4])):
        assert torch.allclose(weights, tensors["after"][call], atol=ATOL), f"call {call}"
        assert divergences == pytest.approx(golden["calls"][call]["divergences"], rel=1e-5)
        assert lambdas.tolist() == pytest.approx(golden["calls"][call]["div_lambda"], rel=1e-5)


def test_compat_pool_clients_keep_their_own_weights():
    case = "aware_full_l1/as_run"
    weights = _run(case, compat=True, sizes=[1, 1, 1, 1])[0][0]
    assert torch.equal(weights, TENSORS[case]["before"][0])


def test_compat_plain_fedavg_averages_client_0_in_place_of_the_pools_first():
    case = "plain_sampled/as_run"
    results = _run(case, compat=True, sizes=[1, 2, 3, 4], aware=False)
    for call, (weights, divergences, _) in enumerate(results):
        assert torch.allclose(weights, TENSORS[case]["after"][call], atol=ATOL), f"call {call}"
        assert divergences == pytest.approx(GOLDEN[case]["calls"][call]["divergences"], rel=1e-5)
    # By default the average is the pool's own (client 0 is not in the first pool).
    default = _run(case, compat=False, sizes=[1, 1, 1, 1], aware=False)[0][0]
    before = TENSORS[case]["before"][0]
    assert torch.allclose(default, before[[1, 3]].mean(dim=0).expand_as(before), atol=ATOL)
    assert not torch.allclose(default, TENSORS[case]["after"][0], atol=1e-3)


# Divergence-aware FedAvg's rule is checked against MocoSFL's own fedavg in tests/sfl/test_fedavg.py; here,
# that the loop runs it on its client engines and logs the divergences.
def _fedavg_around(trainer, monkeypatch) -> list[tuple[dict, dict]]:
    """Record the client weights just before and just after each FedAvg of the trainer."""
    from functions.train import trainer as simulator

    seen, real = [], simulator.fedavg

    def recording(clients, pool, *args, **kwargs):
        before = {k: v.clone() for k, v in clients.stacked_state(range(trainer.args.num_client)).items()}
        result = real(clients, pool, *args, **kwargs)
        seen.append((before, {k: v.clone() for k, v in clients.stacked_state(range(trainer.args.num_client)).items()}))
        return result

    monkeypatch.setattr(simulator, "fedavg", recording)
    return seen


@pytest.mark.parametrize("make, engine", [(moco_trainer, "vmap"), (moco_trainer, "loop"), (swav_trainer, "vmap")])
def test_divergence_awareness_mixes_each_client_by_one_mu_in_the_loop(tmp_path, monkeypatch, make, engine):
    # One step with a FedAvg after it (the first of --avg_freq 16 in the epoch).
    trainer = make(tmp_path, "--num_client", "2", "--num_epoch", "1", "--divergence_aware", "--divergence_measure",
                   "--div_lambda", "0.5", "--client_exec", engine, "--max_steps", "1", "--avg_freq", "16")
    seen = _fedavg_around(trainer, monkeypatch)
    trainer.train()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["client_divergence"][0][1] > 0
    before, after = seen[-1]
    names = [name for name, rows in before.items() if rows.is_floating_point()]
    average = {name: before[name].double().mean(dim=0) for name in names}  # synthetic shards are equal
    for client in range(2):
        # after - average = mu * (before - average), the same mu for every tensor of the client, 0 < mu < 1.
        own = torch.cat([(before[n][client].double() - average[n]).flatten() for n in names])
        mixed = torch.cat([(after[n][client].double() - average[n]).flatten() for n in names])
        mu = float(mixed @ own / (own @ own))
        assert 0 < mu < 1 and torch.allclose(mixed, mu * own, atol=1e-6)
    assert not trainer.fedavg_rule.lambdas.isnan().any() and trainer.fedavg_rule.rescaled.all()


def test_compat_divergence_awareness_leaves_the_pool_clients_as_they_are(tmp_path, monkeypatch):
    trainer = moco_trainer(tmp_path, "--num_client", "2", "--num_epoch", "1", "--divergence_aware",
                           "--compat", "mocosfl", "--max_steps", "1", "--avg_freq", "16")
    seen = _fedavg_around(trainer, monkeypatch)
    trainer.train()
    before, after = seen[-1]
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not trainer.fedavg_rule.auto_scaler


def test_fedavg_is_weighted_by_data_size_and_loaded_into_every_client():
    clients = three_different_clients()
    weights = [clients.models[c].weight.detach().clone() for c in range(3)]
    fedavg(clients, [0, 2], {0: 30, 2: 10}, Runtime(device=torch.device("cpu")))
    expected = 0.75 * weights[0] + 0.25 * weights[2]
    for model in clients.models:
        assert torch.allclose(model.weight, expected, atol=1e-6)


def test_fedavg_of_identical_clients_is_the_identity():
    clients = ClientSide(nn.Linear(4, 3), 4, lr=0.1, momentum=0.0, weight_decay=0.0, keep_momentum_copies=True,
                         device=torch.device("cpu"))
    before = clients.models[0].weight.detach().clone()
    fedavg(clients, [0, 1, 2, 3], [5, 1, 7, 3], Runtime(device=torch.device("cpu")), include_momentum_copies=True)
    for model in clients.models + clients.momentum_models:
        assert torch.equal(model.weight, before)


def test_fedavg_runs_avg_freq_times_per_epoch_the_last_at_the_end():
    assert fedavg_positions(10, 1) == {9}
    assert fedavg_positions(10, 2) == {4, 9}
    assert fedavg_positions(3, 5) == {0, 1, 2}


