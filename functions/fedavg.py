"""Federated averaging: when it runs, which weight each client gets, and the weighted average itself.

One weighting rule (`fedavg_weights`) and one average (`weighted_average`) serve both client engines (the loop
and the vectorised one hand over their clients' weights stacked, `stacked_state`) and torchrun (each rank
averages its own clients with the global weights, then one all-reduce sums the parts).
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import torch
from torch import Tensor

from functions.distributed import Runtime, all_reduce_sum, client_shares


class StackedClients(Protocol):
    """What averaging needs from a client engine."""

    def stacked_state(self, client_ids: Sequence[int], momentum_copies: bool = False) -> dict[str, Tensor]:
        """Every weight of the given clients (or their momentum copies) stacked: (len(client_ids), *shape)."""
        ...

    def set_every_client(self, state: dict[str, Tensor], momentum_copies: bool = False) -> None:
        """Load one state into every client's model, or into every momentum copy."""
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


def fedavg(clients: StackedClients, pool: Sequence[int], client_sizes: Sequence[int], runtime: Runtime,
           include_momentum_copies: bool = False) -> None:
    """FedAvg: the weighted average of the pool's clients is loaded into every client (over all ranks)."""
    clients.set_every_client(average_pool(clients, pool, client_sizes, runtime))
    if include_momentum_copies:
        clients.set_every_client(average_pool(clients, pool, client_sizes, runtime, momentum_copies=True),
                                 momentum_copies=True)
