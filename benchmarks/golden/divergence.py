"""Golden part `divergence`: MocoSFL's FedAvg, plain and divergence-aware, on tiny client models with fixed weights.

    python benchmarks/golden/divergence.py --peer_dir MOCOSFL_CHECKOUT

MocoSFL's base_simulator.fedavg (functions/base_funtions.py) runs on four clients (Linear 3->4, BatchNorm1d 4,
Linear 4->2; weights drawn from fixed seeds), twice in a row (the clients' weights are moved between the calls),
for pools with and without client 0 and lambda 0.05 and 1:

* "as_run": MocoSFL's code as it is;
* "intended": the same code with each model's state_dict() returning one dict that is loaded back after the call,
  so that its per-key assignment of mu * own + (1 - mu) * average takes effect (what the code means to do).

Recorded: every client's weights after each call, the divergences MocoSFL measures, its lambdas (div_lambda).
"""
from __future__ import annotations

import argparse
from typing import Any

import peer

NUM_CLIENT = 4
CASES = {  # name: (pool of each call, divergence_aware, div_lambda)
    "aware_full_l0.05": ([[0, 1, 2, 3], [0, 1, 2, 3]], True, 0.05),
    "aware_full_l1": ([[0, 1, 2, 3], [0, 1, 2, 3]], True, 1.0),
    "aware_sampled_l0.05": ([[1, 3], [0, 2]], True, 0.05),
    "aware_sampled_l1": ([[1, 3], [0, 2]], True, 1.0),
    "aware_with_client0_l1": ([[0, 2], [0, 1, 3]], True, 1.0),
    "plain_sampled": ([[1, 3], [0, 2]], False, 1.0),
}
# MocoSFL averages client 0 in place of the pool's first client: the "intended" variant is recorded only where
# every pool starts with client 0 (there its average is the pool's).


def client_models() -> list[Any]:
    """Four small client models: one initialisation, moved apart by fixed seeds (weights and BatchNorm statistics)."""
    import torch
    from torch import nn

    models = []
    for client in range(NUM_CLIENT):
        torch.manual_seed(100)  # one starting point, as after a FedAvg
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        generator = torch.Generator().manual_seed(200 + client)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.04 * (client + 1))
            model[1].running_mean.copy_(torch.randn(4, generator=generator))
            model[1].running_var.copy_(torch.rand(4, generator=generator) + 0.5)
        models.append(model)
    return models


def move(models: list[Any], call: int) -> None:
    """Change every client's weights between two calls (as local training would)."""
    import torch

    with torch.no_grad():
        for client, model in enumerate(models):
            generator = torch.Generator().manual_seed(1000 * call + client)
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01 * (client + 1))


def floating_state(model: Any) -> Any:
    """Every floating tensor of the model's state, flattened into one vector in state_dict order."""
    import torch

    return torch.cat([value.detach().flatten().clone() for value in model.state_dict().values()
                      if value.is_floating_point()])


def stacked(states: list[list[Any]]) -> Any:
    """(calls, clients, values) from a list (per call) of lists (per client) of flat states."""
    import torch

    return torch.stack([torch.stack(row) for row in states])


def run_case(pools: list[list[int]], aware: bool, div_lambda: float, intended: bool) -> tuple[dict, dict]:
    """MocoSFL's fedavg called once per pool on the same four clients: (values, tensors)."""
    import collections

    from functions.base_funtions import base_simulator  # MocoSFL's

    models = client_models()
    simulator = base_simulator.__new__(base_simulator)  # its fedavg reads only these attributes
    simulator.model = type("Model", (), {"local_list": models})()
    simulator.num_client = NUM_CLIENT
    simulator.div_lambda = [div_lambda for _ in range(NUM_CLIENT)]
    simulator.auto_scaler = True
    values: dict[str, Any] = {"pools": pools, "divergence_aware": aware, "div_lambda": div_lambda, "calls": []}
    tensors: dict[str, Any] = {"before": [[floating_state(m) for m in models]], "after": []}
    for call, pool in enumerate(pools):
        if call:
            move(models, call)
            tensors["before"].append([floating_state(m) for m in models])
        if intended:
            kept = [collections.OrderedDict(m.state_dict()) for m in models]
            for model, state in zip(models, kept):
                model.state_dict = (lambda state=state: state)
        divergences = simulator.fedavg(pool, divergence_aware=aware, divergence_measure=True)
        if intended:
            for model, state in zip(models, kept):
                del model.state_dict
                model.load_state_dict({key: value.to(model.state_dict()[key].dtype) for key, value in state.items()})
        values["calls"].append({"divergences": [float(d) for d in divergences],
                                "div_lambda": [float(v) for v in simulator.div_lambda],
                                "auto_scaler": bool(simulator.auto_scaler)})
        tensors["after"].append([floating_state(m) for m in models])
    return values, {name: stacked(rows) for name, rows in tensors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_dir", required=True, help="a checkout of MocoSFL")
    options = parser.parse_args()
    peer.import_mocosfl(options.peer_dir)
    values: dict[str, Any] = {"num_client": NUM_CLIENT,
                              "state_layout": [[key, list(value.shape)] for key, value in
                                               client_models()[0].state_dict().items() if value.is_floating_point()]}
    tensors: dict[str, Any] = {}
    for name, (pools, aware, div_lambda) in CASES.items():
        for variant in ("as_run", "intended"):
            if variant == "intended" and (not aware or any(pool[0] != 0 for pool in pools)):
                continue
            values[f"{name}/{variant}"], tensors[f"{name}/{variant}"] = run_case(pools, aware, div_lambda,
                                                                               variant == "intended")
    peer.write_fixture("divergence", options.peer_dir, values, tensors)


if __name__ == "__main__":
    main()
