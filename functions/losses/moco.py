"""MoCo's losses and key queues as pure functions and small state classes (He et al.; MocoSFL's variants).

They know nothing about clients, optimisers or the training loop, so they can be checked directly against the
formulas.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from functions.core.errors import UserError
from functions.data.layout import StepLayout


def _check_temperature(temperature: float) -> None:
    """Reject a temperature that would divide by zero or flip the logits."""
    if not temperature > 0:
        raise UserError(f"the MoCo temperature must be > 0 (got {temperature}); set --T to a positive value such as 0.2")


def info_nce_loss(query: Tensor, key: Tensor, negatives: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """InfoNCE of each query against its own key (positive) and the queue (negatives); returns (mean loss, top-1 accuracy).

    query, key: (N, D), any scale; both are L2-normalised here and no gradient flows into ``key``.
    negatives: (K, D), already L2-normalised (the rows of a ``KeyQueue``); treated as constants.
    The logits (N, 1 + K) are [q.k, q.n_1 ... q.n_K] / temperature with the positive in column 0, and the loss
    is their mean cross-entropy with target 0. Accuracy is the fraction of rows whose largest logit is the
    positive. Everything is computed in float32, also under autocast or with fp16/bf16 inputs, because
    exp(1 / T) with a small T overflows half precision.
    """
    _check_temperature(temperature)
    if query.dim() != 2 or query.shape != key.shape:
        raise ValueError(f"query and key must both be (N, D); got {tuple(query.shape)} and {tuple(key.shape)}")
    if negatives.dim() != 2 or negatives.shape[1] != query.shape[1]:
        raise ValueError(f"negatives must be (K, {query.shape[1]}); got {tuple(negatives.shape)}")
    with torch.autocast(device_type=query.device.type, enabled=False):
        query_unit = F.normalize(query.float(), dim=1)
        key_unit = F.normalize(key.detach().float(), dim=1)
        negatives_fp32 = negatives.detach().float()
        positive_logits = (query_unit * key_unit).sum(dim=1, keepdim=True)
        negative_logits = query_unit @ negatives_fp32.T
        logits = torch.cat([positive_logits, negative_logits], dim=1) / temperature
        targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.detach().argmax(dim=1) == 0).float().mean()
    return loss, accuracy


def symmetric_info_nce_loss(
    q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, negatives: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE: loss(q1,k2) + loss(q2,k1) (MocoSFL's --symmetric), with mean accuracy.

    q1, q2 are the query-encoder outputs of views 1 and 2, k1, k2 the key-encoder outputs of the same views.
    The two terms are summed, not averaged, as MocoSFL does; the returned accuracy is the mean of the two
    terms' accuracies. Both terms use the same ``negatives``.
    """
    loss_12, accuracy_12 = info_nce_loss(q1, k2, negatives, temperature)
    loss_21, accuracy_21 = info_nce_loss(q2, k1, negatives, temperature)
    return loss_12 + loss_21, (accuracy_12 + accuracy_21) / 2


class KeyQueue:
    """Ring buffer of the last `size` normalised keys shared by all clients (MoCo's dictionary).

    ``negatives`` is a (size, dim) float32 tensor; ``pointer`` is the row the next key is written to.
    It starts as random unit rows, so the first steps already have a full set of (uninformative) negatives.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        unit_rows: bool = True,
    ) -> None:
        if size < 1:
            raise UserError(f"the MoCo queue size must be >= 1 (got {size}); set --K to a positive number of keys")
        if dim < 1:
            raise UserError(f"the MoCo feature dimension must be >= 1 (got {dim}); set --K_dim to a positive value")
        self.size = size
        self.dim = dim
        # Draw on the generator's own device so a CPU generator can seed a queue that lives on the GPU.
        draw_device = generator.device if generator is not None else device
        initial = torch.randn(size, dim, generator=generator, device=draw_device, dtype=torch.float32)
        # unit_rows=False: the raw Gaussian rows MocoSFL starts its per-client queues with (--compat mocosfl).
        self.negatives: Tensor = (F.normalize(initial, dim=1) if unit_rows else initial).to(device)
        self.pointer: int = 0

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write the (N, dim) keys, normalised, at the pointer with wrap-around and advance the pointer by N.

        The result equals writing the keys one by one in batch order, so when N > size only the newest
        (last) ``size`` keys survive.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (N, {self.dim}); got {tuple(keys.shape)}")
        count = keys.shape[0]
        if count == 0:
            return
        keys_unit = F.normalize(keys.detach().float(), dim=1).to(self.negatives.device)
        rows = (self.pointer + torch.arange(count, device=self.negatives.device)) % self.size
        # Only the last `size` writes survive; dropping the others also keeps the row indices unique.
        kept = min(count, self.size)
        self.negatives[rows[-kept:]] = keys_unit[-kept:]
        self.pointer = (self.pointer + count) % self.size

    def state_dict(self) -> dict:
        """The queue contents and pointer, for checkpoints."""
        return {"negatives": self.negatives.detach().clone(), "pointer": self.pointer}

    def load_state_dict(self, state: dict) -> None:
        """Restore contents and pointer saved by ``state_dict``; the queue size and dim must match."""
        negatives = state["negatives"]
        if tuple(negatives.shape) != (self.size, self.dim):
            raise UserError(
                f"the checkpoint's MoCo queue is {tuple(negatives.shape)} but this run expects ({self.size}, {self.dim});"
                " resume with the same --K and --K_dim as the checkpointed run"
            )
        pointer = int(state["pointer"])
        if not 0 <= pointer < self.size:
            raise UserError(f"the checkpoint's MoCo queue pointer {pointer} is outside [0, {self.size}); the checkpoint is damaged")
        self.negatives.copy_(negatives.to(self.negatives.device, torch.float32))
        self.pointer = pointer


def dual_temperature_loss(query: Tensor, key: Tensor, temperature: float, dt_m: float = 10.0) -> tuple[Tensor, Tensor]:
    """SimCo's dual-temperature InfoNCE with in-batch negatives (the seed's --loss_type simco); (loss, accuracy).

    Row i's positive is key i, its negatives the other keys of the batch. The cross-entropy at `temperature` is
    weighted, per row and without gradient, by (1 - p_inter) / (1 - p_intra), the probabilities of the positive
    at temperature * dt_m and at temperature (Zhang et al., dual temperature helps contrastive learning).
    """
    _check_temperature(temperature)
    if query.dim() != 2 or query.shape != key.shape or query.shape[0] < 2:
        raise ValueError(f"query and key must both be (N, D) with N >= 2; got {tuple(query.shape)}, {tuple(key.shape)}")
    with torch.autocast(device_type=query.device.type, enabled=False):
        query_unit, key_unit = F.normalize(query.float(), dim=1), F.normalize(key.float(), dim=1)
        similarity = query_unit @ key_unit.T
        rows = similarity.shape[0]
        positive = similarity.diagonal().unsqueeze(1)
        negatives = similarity.masked_select(~torch.eye(rows, dtype=torch.bool, device=similarity.device))
        logits = torch.cat([positive, negatives.view(rows, rows - 1)], dim=1)
        intra = F.softmax(logits / temperature, dim=1)[:, 0]
        inter = F.softmax(logits / (temperature * dt_m), dim=1)[:, 0]
        weight = ((1 - inter) / (1 - intra)).detach()
        loss = (weight * -F.log_softmax(logits / temperature, dim=1)[:, 0]).mean()
        accuracy = (logits.detach().argmax(dim=1) == 0).float().mean()
    return loss, accuracy


class ClientQueues:
    """The key queue of the run: one shared KeyQueue of `size` keys, or (num_client > 0, MocoSFL's
    --disable_feature_sharing) one KeyQueue of size // num_client keys per client, each fed its own client's keys."""

    def __init__(self, size: int, dim: int, num_client: int = 0, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None, unit_client_rows: bool = True) -> None:
        self.per_client = num_client > 0
        self.shared = KeyQueue(size, dim, device=device, generator=generator) if not self.per_client else None
        self.clients = [KeyQueue(size // num_client, dim, device=device, generator=generator,
                                 unit_rows=unit_client_rows) for _ in range(num_client)]

    def of(self, client: int) -> KeyQueue:
        """The queue of `client` (per-client queues only)."""
        return self.clients[client]

    def enqueue(self, keys: Tensor, layout: StepLayout) -> None:
        """Enqueue the step's keys: blocks of the pool's rows (every process's), each client's rows into its queue."""
        if not self.per_client:
            self.shared.enqueue(keys)
            return
        total = sum(layout.pool_rows)
        blocks = keys.split(total)
        for client, begin, end in layout.pool_blocks():
            self.of(client).enqueue(torch.cat([block[begin:end] for block in blocks]))

    def state_dict(self) -> dict:
        """Queue contents for checkpoints (the shared queue under the key of earlier checkpoints)."""
        if not self.per_client:
            return {"queue": self.shared.state_dict()}
        return {"client_queues": [queue.state_dict() for queue in self.clients]}

    def load_state_dict(self, state: dict) -> None:
        if not self.per_client:
            self.shared.load_state_dict(state["queue"])
            return
        if len(state["client_queues"]) != len(self.clients):
            raise UserError(f"the checkpoint holds {len(state['client_queues'])} client queues, this run has "
                            f"{len(self.clients)} clients")
        for queue, queue_state in zip(self.clients, state["client_queues"]):
            queue.load_state_dict(queue_state)
