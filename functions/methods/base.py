"""The server-method interface of the one training loop, and the registry of methods by name.

A method (MoCo, SwAV, ...) is one class in one module: its options, its head, its views, its loss and its state.
It registers itself with `@register_method(name, ...)`; the loop, the options, the models and the benchmark only ever ask
the registry, never a method's name. Modules named ``functions/sfl<name>_functions.py`` are imported the first time
the registry is read, so their methods are known to every entry point; a method defined elsewhere (a test, a
notebook) is known once its module has been imported.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn

from functions.data.layout import StepLayout
from functions.data.views import ViewSpec
from functions.methods.schedules import LearningRateSchedule

if TYPE_CHECKING:
    from functions.data.datasets import DatasetEntry
    from models.split import HeadBuilder

class ServerMethod(nn.Module):
    """Server part of the network plus a self-supervised loss and its state (queues, momentum encoders, prototypes).

    Class level (before anything is built): `name`, `entry_script` and `description` (set by register_method);
    `add_arguments` and `check_args` (its options); `head_builder` (what follows the pooled backbone features);
    `view_spec` (the crops each client makes); `learning_rate_schedule`.

    Per step the loop calls `compute_loss` on the smashed activations of `trainable_crops` (with graph) and of
    `momentum_crops` (clients' momentum copies, no graph), then `before_server_step`, the optimizer step, and
    `after_server_step`.
    """

    name: str = "method"
    entry_script: str = ""          # the script that runs this method, for printed commands (resume)
    description: str = ""           # one line for --help
    trainable_crops: tuple[int, ...] = ()
    momentum_crops: tuple[int, ...] = ()
    gradient_crops: tuple[int, ...] | None = None  # trainable crops whose gradients go back to the clients; None: all
    client_momentum: float = 0.0    # momentum of the clients' key copies; 0 = clients keep no copies
    average_momentum_copies = False  # FedAvg also averages the clients' momentum copies
    per_client_server_updates = False  # one server step per client instead of one joint step (an ablation)

    def __init__(self, args: argparse.Namespace, server: nn.Module, device: torch.device) -> None:
        """`server` is the server part of the network (backbone units after the cut and this method's head)."""
        super().__init__()
        self.server = server

    # ------------------------------------------------------------------------------------------ class level
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the method's options (one argument group) to its entry script's parser."""

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Refuse impossible method options (UserError, one line) and fill derived values."""

    @classmethod
    def head_builder(cls, args: argparse.Namespace) -> "HeadBuilder":
        """What the server puts after the pooled backbone features (projection, prototypes)."""
        raise NotImplementedError

    @classmethod
    def view_spec(cls, args: argparse.Namespace, dataset: "DatasetEntry") -> ViewSpec:
        """The crops each client makes of an image of `dataset`."""
        raise NotImplementedError

    @classmethod
    def checkpoint_problem(cls, saved_args: dict) -> str | None:
        """Why a checkpoint with these options cannot be continued or evaluated by this version (None: it can)."""
        return None

    @classmethod
    def learning_rate_schedule(cls, args: argparse.Namespace, steps_per_epoch: int) -> LearningRateSchedule:
        """Server and client learning rates per (epoch, step); --cos or MultiStepLR unless a method has its own."""
        return LearningRateSchedule(args, steps_per_epoch)

    # ------------------------------------------------------------------------------------------- training
    def optimized_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.server.parameters() if p.requires_grad]

    def encode_features(self, smashed: torch.Tensor) -> torch.Tensor:
        """Backbone features of the server part (what the kNN and linear probes see)."""
        return self.server.features(smashed)

    def compute_loss(self, smashed: Sequence[torch.Tensor], momentum_smashed: Sequence[torch.Tensor],
                     epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def start_step(self, layout: StepLayout) -> None:
        """Hook before the step's loss, once per server step: which clients sent which rows (e.g. for per-client
        queues); MoCo moves its momentum encoder here, as MocoSFL does before its forward passes."""

    def before_server_step(self, global_step: int) -> None:
        """Hook between backward and the server optimizer step (e.g. freezing prototypes)."""

    def after_server_step(self) -> None:
        """Hook after the server optimizer step (e.g. the queue push of the step's keys)."""

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


# ------------------------------------------------------------------------------------------------ registry


