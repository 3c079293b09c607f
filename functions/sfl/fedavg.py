"""Federated averaging: when it runs, which weight each client gets, and the weighted average itself.

One weighting rule (`fedavg_weights`) and one average (`weighted_average`) serve both client engines (the loop
and the vectorised one hand over their clients' weights stacked, `stacked_state`) and torchrun (each rank
averages its own clients with the global weights, then one all-reduce sums the parts). What the clients load
after the average is the run's FedAvg rule's (functions.sfl.fedavg_rules).
"""
from __future__ import annotations

import logging
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from functions.core.distributed import Runtime, all_reduce_sum, client_shares
from functions.sfl.fedavg_rules import FedAvgRule

logger = logging.getLogger("sfl")


class StackedClients(Protocol):
    """What averaging needs from a client engine."""

    def stacked_state(self, client_ids: Sequence[int], momentum_copies: bool = False) -> dict[str, Tensor]:
        """Every weight of the given clients (or their momentum copies) stacked: (len(client_ids), *shape)."""
        ...

    def set_every_client(self, state: dict[str, Tensor], momentum_copies: bool = False) -> None:
        """Load one state into every client's model, or into every momentum copy."""
        ...

    def set_clients(self, client_ids: Sequence[int], stacked: dict[str, Tensor]) -> None:
        """Load row j of every stacked tensor into client client_ids[j]."""
        ...


def fedavg_positions(steps_per_epoch: int, avg_freq: int) -> set[int]:
    """Steps (0-based, within an epoch) after which FedAvg runs: avg_freq times, evenly spaced, the last at the end."""
    return {max(0, round((i + 1) * steps_per_epoch / avg_freq) - 1) for i in range(avg_freq)}


def fedavg_weights(client_sizes: Sequence[int], pool: Sequence[int]) -> list[float]:
    """FedAvg weight of each client of the pool: its share of the pool's training samples (they sum to 1)."""
    total = float(sum(client_sizes[client] for client in pool))
    return [client_sizes[client] / total for client in pool]


@torch.no_grad()
def weighted_average(stacked: Mapping[str, Tensor], weights: Sequence[float],
                     dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """sum_i weights[i] * stacked[name][i] for every floating tensor, accumulated in float64 and returned in `dtype`
    (default: the tensor's own); integer tensors (counters) take row 0."""
    averaged: dict[str, Tensor] = {}
    coefficients: Tensor | None = None
    for name, rows in stacked.items():
        if rows.shape[0] != len(weights):
            raise ValueError(f"{rows.shape[0]} clients of {name} but {len(weights)} averaging weights")
        if not rows.is_floating_point():
            averaged[name] = rows[0].clone()
            continue
        if coefficients is None or coefficients.device != rows.device:
            coefficients = torch.tensor([float(w) for w in weights], dtype=torch.float64, device=rows.device)
        rows64 = rows.detach().to(torch.float64)
        averaged[name] = (rows64 * coefficients.view(-1, *([1] * (rows64.dim() - 1)))).sum(dim=0).to(dtype or rows.dtype)
    return averaged


def average_pool(clients: StackedClients, pool: Sequence[int], client_sizes: Sequence[int], runtime: Runtime,
                 momentum_copies: bool = False) -> dict[str, Tensor]:
    """The FedAvg of the pool's clients (every rank's): each rank sums its own clients' weighted part, then the
    parts are summed over ranks (float64 until then)."""
    weight_of = dict(zip(pool, fedavg_weights(client_sizes, pool)))
    if not runtime.is_distributed:
        return weighted_average(clients.stacked_state(pool, momentum_copies), [weight_of[c] for c in pool])
    own = client_shares(pool, runtime.world_size)[runtime.rank]
    partial = weighted_average(clients.stacked_state(own, momentum_copies), [weight_of[c] for c in own],
                               dtype=torch.float64)
    for value in partial.values():
        if value.is_floating_point():
            all_reduce_sum(value)
    return partial


def weight_names(stacked: Mapping[str, Tensor]) -> list[str]:
    """The learned tensors (layers) of a state: floating, not BatchNorm running statistics (MocoSFL skips them)."""
    return [name for name, rows in stacked.items() if rows.is_floating_point() and "running_" not in name]


def layer_divergences(stacked: Mapping[str, Tensor], average: Mapping[str, Tensor]) -> Tensor:
    """(clients, layers) L2 norm of each client's difference from the average, per learned tensor (layer)."""
    names = weight_names(stacked)
    return torch.stack([(stacked[name].double() - average[name].double().to(stacked[name].device)).flatten(1).norm(dim=1)
                        for name in names], dim=1)


def mocosfl_average_members(pool: Sequence[int]) -> list[int]:
    """The clients MocoSFL's average_weights sums (then divides by the pool's size): client 0 in place of the
    pool's first client (the same clients when client 0 is in the pool, whose first client it is here)."""
    return [0, *list(pool)[1:]]


def fedavg(clients: StackedClients, pool: Sequence[int], client_sizes: Sequence[int], runtime: Runtime,
           include_momentum_copies: bool = False, rule: FedAvgRule | None = None, measure: bool = False,
           mocosfl_compat: bool = False) -> list[float] | None:
    """FedAvg: the weighted average of the pool's clients, made the global state by the `rule` (default: plain
    FedAvg, the average itself), is loaded into every client (over all ranks); with a personalised rule (e.g.
    divergence-aware), the pool's clients keep the rule's mix instead. With `measure` (or a personalised rule),
    returns the divergence of every pool client from the global state (sum over layers of the L2 norms, as MocoSFL
    measures it), in pool order on every rank.

    `mocosfl_compat` (--compat mocosfl): MocoSFL's average, of client 0 and the pool's other clients with equal
    weights (see mocosfl_average_members)."""
    if mocosfl_compat:
        # Under torchrun the Trainer refuses client sampling with it (client 0 is not held by every pool's ranks).
        average = average_pool(clients, mocosfl_average_members(pool), [1] * len(client_sizes), runtime)
    else:
        average = average_pool(clients, pool, client_sizes, runtime)
    personalised = rule is not None and rule.personalised
    if rule is not None:
        average = rule.global_state(average)
    divergences = None
    if personalised or measure:
        own = client_shares(pool, runtime.world_size)[runtime.rank] if runtime.is_distributed else list(pool)
        own_state = clients.stacked_state(own)
        own_divergences = layer_divergences(own_state, average).sum(dim=1)
        divergences = _pool_divergences(own_divergences, own, pool, runtime)
        if personalised:
            mixed = rule.mix(own, own_state, average, runtime, own_divergences, pool)
    clients.set_every_client(average)
    if personalised:
        clients.set_clients(own, mixed)
    if include_momentum_copies:
        clients.set_every_client(average_pool(clients, pool, client_sizes, runtime, momentum_copies=True),
                                 momentum_copies=True)
    return divergences


def _pool_divergences(own_values: Tensor, own: Sequence[int], pool: Sequence[int], runtime: Runtime) -> list[float]:
    """Every pool client's divergence, in pool order, on every rank (each rank measured its own clients)."""
    values = torch.zeros(len(pool), dtype=torch.float64, device=own_values.device)
    position = {client: j for j, client in enumerate(pool)}
    values[[position[c] for c in own]] = own_values.double()
    if runtime.is_distributed:
        values = all_reduce_sum(values.to(runtime.device))
    return values.cpu().tolist()


def divergence_summary(divergences: Sequence[float]) -> dict[str, float]:
    """Mean and spread of the pool clients' divergences at the epoch's last FedAvg (logged with every value)."""
    if not divergences:
        return {}
    values = np.asarray(divergences)
    logger.info(f"client divergence: mean {values.mean():.4g}, std {values.std():.4g}, per client "
                f"{[round(v, 4) for v in values.tolist()]}")
    return {"client_divergence": float(values.mean()), "client_divergence_std": float(values.std())}
