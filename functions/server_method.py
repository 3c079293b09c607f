"""The small interface every server-side method (MoCo, SwAV) implements for the one training loop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class ViewSpec:
    """Which augmented views each client produces: `nmb_crops[i]` crops of `size_crops[i]` pixels, crop-major."""
    nmb_crops: tuple[int, ...]
    size_crops: tuple[int, ...]
    min_scale_crops: tuple[float, ...]
    max_scale_crops: tuple[float, ...]

    @property
    def total_crops(self) -> int:
        return sum(self.nmb_crops)


class ServerMethod(nn.Module):
    """Server part of the network plus a self-supervised loss and its state (queues, momentum encoders, prototypes).

    The loop calls, per step: `compute_loss` on the smashed activations of `trainable_crops` (with graph) and of
    `momentum_crops` (clients' momentum copies, no graph), then `before_server_step`, the optimizer step, and
    `after_server_step`.
    """

    name: str = "method"
    trainable_crops: tuple[int, ...] = ()
    momentum_crops: tuple[int, ...] = ()
    client_momentum: float = 0.0  # momentum of the clients' key copies; 0 = clients keep no copies

    def __init__(self, server: nn.Module) -> None:
        super().__init__()
        self.server = server

    def optimized_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.server.parameters() if p.requires_grad]

    def encode_features(self, smashed: torch.Tensor) -> torch.Tensor:
        """Backbone features of the server part (what the kNN and linear probes see)."""
        return self.server.features(smashed)

    def compute_loss(self, smashed: Sequence[torch.Tensor], momentum_smashed: Sequence[torch.Tensor],
                     epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def before_server_step(self, global_step: int) -> None:
        """Hook between backward and the server optimizer step (e.g. freezing prototypes)."""

    def after_server_step(self) -> None:
        """Hook after the server optimizer step (e.g. momentum encoder update, queue push)."""

    def start_epoch(self, epoch: int) -> None:
        """Hook at the start of each epoch."""

    def epoch_summary(self) -> dict[str, float]:
        """Per-epoch monitoring values (e.g. SwAV's code entropy), logged to tensorboard and metrics.json."""
        return {}

    def extra_state(self) -> dict:
        """State beyond the module's parameters and buffers (queues, RNG)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned."""
