"""The client side of one process: every simulated client's model, optimizer and momentum copy.

The training loop sees one object: `forward` turns the pool's crops into smashed activations (rows grouped by
client, as the loader stacked them), `backward` sends each client exactly the gradient rows it produced
(sliced by `query_index`, the running sum of `query_num`), `step` updates the clients of the pool, and
`stacked_state` / `set_every_client` let functions.sfl.fedavg average them. Inside it is a plain loop over
per-client modules.
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from torch import nn

from functions.core.errors import UserError


@torch.no_grad()
def momentum_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameter by parameter (buffers copied)."""
    if not 0.0 <= momentum <= 1.0:
        raise UserError(f"the momentum of a key encoder must be in [0, 1] (got {momentum}); use a value such as 0.99")
    target_parameters = dict(target.named_parameters())
    source_parameters = dict(source.named_parameters())
    if target_parameters.keys() != source_parameters.keys():
        raise ValueError("momentum_update_ needs two modules with the same parameter names")
    for name, target_parameter in target_parameters.items():
        target_parameter.mul_(momentum).add_(source_parameters[name].detach(), alpha=1.0 - momentum)
    target_buffers = dict(target.named_buffers())
    source_buffers = dict(source.named_buffers())
    if target_buffers.keys() != source_buffers.keys():
        raise ValueError("momentum_update_ needs two modules with the same buffer names")
    # Buffers (e.g. BatchNorm running statistics) are not averaged: the key encoder takes the source's.
    for name, target_buffer in target_buffers.items():
        target_buffer.copy_(source_buffers[name])


def query_index(rows_per_client: Sequence[int]) -> list[int]:
    """Row offsets [0, n0, n0+n1, ...]: client j owns rows query_index[j]:query_index[j+1] of every crop."""
    return np.concatenate([[0], np.cumsum(rows_per_client)]).astype(int).tolist()


class ClientSide:
    """All clients simulated by this process; clients start from identical weights (the template)."""

    def __init__(self, template: nn.Module, num_client: int, *, lr: float, momentum: float, weight_decay: float,
                 keep_momentum_copies: bool, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        # channels_last: the convolution kernels in NHWC; the caller passes NHWC crops too.
        template = template.to(device, memory_format=memory_format)
        self.models = [copy.deepcopy(template) for _ in range(num_client)]
        self.momentum_models = [self._frozen_copy(model) for model in self.models] if keep_momentum_copies else []
        self.optimizers = [torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
                           for model in self.models]
        self._outputs: list[tuple[int, list[torch.Tensor]]] = []
        self._rows: list[int] = []

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        frozen = copy.deepcopy(model)
        for parameter in frozen.parameters():
            parameter.requires_grad_(False)
        return frozen

    @property
    def num_client(self) -> int:
        return len(self.models)

    def forward(self, crops: Sequence[torch.Tensor], client_ids: Sequence[int],
                rows_per_client: Sequence[int]) -> list[torch.Tensor]:
        """Each client's model on its own rows of every crop; returns one smashed tensor per crop, rows in input order."""
        offsets = query_index(rows_per_client)
        self._outputs = []
        self._rows = list(rows_per_client)
        per_crop: list[list[torch.Tensor]] = [[] for _ in crops]
        for j, client in enumerate(client_ids):
            model = self.models[client]
            outputs = [model(crop[offsets[j]:offsets[j + 1]]) for crop in crops]
            self._outputs.append((client, outputs))
            for k, output in enumerate(outputs):
                per_crop[k].append(output)
        return [torch.cat(chunks) for chunks in per_crop]

    @torch.no_grad()
    def momentum_forward(self, crops: Sequence[torch.Tensor], client_ids: Sequence[int],
                         rows_per_client: Sequence[int]) -> list[torch.Tensor]:
        """Each client's momentum copy on its own rows (MoCo's key path); no graph."""
        offsets = query_index(rows_per_client)
        per_crop: list[list[torch.Tensor]] = [[] for _ in crops]
        for j, client in enumerate(client_ids):
            model = self.momentum_models[client]
            for k, crop in enumerate(crops):
                per_crop[k].append(model(crop[offsets[j]:offsets[j + 1]]))
        return [torch.cat(chunks) for chunks in per_crop]

    def backward(self, gradients: Sequence[torch.Tensor | None]) -> None:
        """Back-propagate the server's gradient rows into the client that sent them (gradient_dict[j] = grad[qi[j]:qi[j+1]])."""
        offsets = query_index(self._rows)
        for j, (_, outputs) in enumerate(self._outputs):
            pairs = [(output, gradient[offsets[j]:offsets[j + 1]])
                     for output, gradient in zip(outputs, gradients) if gradient is not None]
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        self._outputs = []

    def forget_outputs(self) -> None:
        """Drop the graph of the last forward (no gradient will come back for it)."""
        self._outputs = []

    def zero_grad(self, client_ids: Sequence[int]) -> None:
        for client in client_ids:
            self.optimizers[client].zero_grad(set_to_none=True)

    def step(self, client_ids: Sequence[int], scaler: torch.amp.GradScaler) -> None:
        """One optimizer step of each client in the pool (through the shared GradScaler)."""
        for client in client_ids:
            scaler.step(self.optimizers[client])

    @torch.no_grad()
    def update_momentum_copies(self, client_ids: Sequence[int], momentum: float) -> None:
        for client in client_ids:
            momentum_update_(self.momentum_models[client], self.models[client], momentum)

    def set_lr(self, lr: float | Sequence[float]) -> None:
        """One rate for every client, or one per client (--compat mocosfl)."""
        rates = [lr] * len(self.optimizers) if isinstance(lr, (int, float)) else list(lr)
        for optimizer, rate in zip(self.optimizers, rates, strict=True):
            for group in optimizer.param_groups:
                group["lr"] = rate

    @torch.no_grad()
    def stacked_state(self, client_ids: Sequence[int], momentum_copies: bool = False) -> dict[str, torch.Tensor]:
        """Every weight of the given clients (or of their momentum copies) stacked: (len(client_ids), *shape)."""
        models = self.momentum_models if momentum_copies else self.models
        states = [models[client].state_dict() for client in client_ids]
        return {name: torch.stack([state[name] for state in states]) for name in states[0]}

    @torch.no_grad()
    def set_every_client(self, state: dict[str, torch.Tensor], momentum_copies: bool = False) -> None:
        """Load one state (e.g. an average) into every client's model, or into every momentum copy."""
        models = self.momentum_models if momentum_copies else self.models
        for model in models:
            reference = model.state_dict()
            model.load_state_dict({name: value.to(reference[name].dtype) for name, value in state.items()})

    @torch.no_grad()
    def set_clients(self, client_ids: Sequence[int], stacked: dict[str, torch.Tensor]) -> None:
        """Load row j of every stacked tensor into client client_ids[j] (e.g. personalised averages)."""
        for j, client in enumerate(client_ids):
            reference = self.models[client].state_dict()
            self.models[client].load_state_dict({name: value[j].to(reference[name].dtype)
                                                 for name, value in stacked.items()})

    def module_with(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A separate client module holding `state` (e.g. the pool's average, for evaluation); clients unchanged."""
        model = copy.deepcopy(self.models[0])
        reference = model.state_dict()
        model.load_state_dict({name: value.to(reference[name].dtype) for name, value in state.items()})
        return model

    def state_dict(self) -> dict:
        return {
            "models": [model.state_dict() for model in self.models],
            "momentum_models": [model.state_dict() for model in self.momentum_models],
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
        }

    def load_state_dict(self, state: dict) -> None:
        for model, model_state in zip(self.models, state["models"], strict=True):
            model.load_state_dict(model_state)
        for model, model_state in zip(self.momentum_models, state["momentum_models"], strict=True):
            model.load_state_dict(model_state)
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
