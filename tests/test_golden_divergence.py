"""FedAvg and divergence-aware FedAvg against MocoSFL's own base_simulator.fedavg (tests/fixtures/mocosfl/
divergence.json and .pt, written by benchmarks/golden/divergence.py) on four tiny clients with fixed weights.

By default the rule MocoSFL's code means ("intended": its mix taking effect; one mu per client from the summed
divergence); with --compat mocosfl its code as it runs ("as_run": the pool's clients keep their own weights, only
the first client's lambda is rescaled, client 0 averaged in place of the pool's first client)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from functions.core.distributed import Runtime
from functions.sfl.fedavg import fedavg
from functions.sfl.fedavg_rules import DivergenceAwareAveraging, FedAvgOptions

FIXTURES = Path(__file__).parent / "fixtures" / "mocosfl"
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
