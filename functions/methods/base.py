"""The server-method contract of the one training loop: `ServerMethod` and the `StepContext` its loss receives.

A method (MoCo, SwAV, ...) is one class in one module: its options, its head, its views, its loss and its state.
It registers itself with `@register_method(name, ...)` (functions/methods/registry.py); the loop, the options, the
models and the benchmark only ever ask the registry, never a method's name. The built-in methods register when
`functions.methods` is imported; a method defined elsewhere (a test, a notebook) is known once its module has been
imported.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn

from functions.core.distributed import Runtime, data_parallel
from functions.data.layout import StepLayout
from functions.data.views import ViewSpec
from functions.methods.schedules import LearningRateSchedule

if TYPE_CHECKING:
    from functions.data.datasets import DatasetEntry
    from models.split import HeadBuilder


@dataclass(frozen=True)
class StepContext:
    """What the loop tells `compute_loss` about a server update besides the smashed data.

    epoch: the epoch in progress (0-based). layout: which clients sent the rows, this process's in the order of the
    smashed rows (`local_blocks`) and the whole pool's in the order rows gathered over processes arrive
    (`pool_blocks`). row_share: this process's fraction of the update's rows; the loop weights the returned loss by
    it (times the number of processes), so the loss must be the mean over this process's rows.
    """

    epoch: int
    layout: StepLayout
    row_share: float = 1.0


class ServerMethod(nn.Module):
    """Server part of the network plus a self-supervised loss and its state (queues, momentum encoders, prototypes).

    Class level (before anything is built): `name`, `entry_script` and `description` (set by register_method);
    `add_arguments` and `check_args` (its options); `head_builder` (what follows the pooled backbone features);
    `view_spec` (the crops each client makes); `learning_rate_schedule`.

    Built as `Method(args, server, device)`; under torchrun the loop then calls `distribute(runtime)` once, before
    the server optimizer exists. Per server update the loop calls `start_server_step()`, then
    `compute_loss(smashed, momentum_smashed, context)` on the smashed rows of `trainable_crops` (with graph) and of
    `momentum_crops` (the clients' momentum copies, no graph), one backward of the returned loss,
    `before_server_step(global_step)`, the optimizer step of `optimized_parameters()`, and, once the clients have
    stepped, `after_server_step()`. With `--server_update per_client` (an option the loop reads from the options of
    a method that declares it, as SwAV does; one process only) the loop runs `compute_loss`, backward,
    `before_server_step` and the optimizer step once per client on that client's rows (its own layout in the
    context), in pool order; `start_server_step` and `after_server_step` still run once.

    The rules that keep a method right under torchrun (each process holds a contiguous block of the pool's clients,
    and a process's rows stacked in rank order are the single-process rows):
    - Every trainable parameter lives in `self.server`: projections, predictors and prototypes belong in the head
      that `head_builder` returns; only the server's parameters are optimised and averaged over processes
      (`distribute` refuses a method whose `optimized_parameters` reach outside it).
    - Every forward pass that trains the server goes through `self.forward_server(x)`, never `self.server(x)`: only
      after a forward through the DDP wrapper are the server's gradients averaged over processes (a submodule of
      the server applied to that output in the same update, like SwAV's prototypes, is averaged with it). Every
      trainable server parameter must get a gradient in every update. Frozen copies (a momentum encoder) are called
      directly, under torch.no_grad().
    - `compute_loss` returns the mean over this process's rows (see StepContext.row_share); the BatchNorm1d layers
      of the server see every process's rows, as one process would.
    - Anything else that mixes rows of several clients (a queue, Sinkhorn sums, in-batch negatives) must do so over
      every process's rows when `self.distributed` is True, with the collectives of functions/core/distributed.py
      (all_gather_rows gives the pool's rows in single-process order, all_reduce_sum sums); state kept across
      updates must stay identical on every process.
    """

    name: str = "method"
    entry_script: str = ""          # the script that runs this method, for printed commands (resume)
    description: str = ""           # one line for --help
    trainable_crops: tuple[int, ...] = ()
    momentum_crops: tuple[int, ...] = ()
    gradient_crops: tuple[int, ...] | None = None  # trainable crops whose gradients go back to the clients; None: all
    client_momentum: float = 0.0    # momentum of the clients' key copies; 0 = clients keep no copies
    average_momentum_copies = False  # FedAvg also averages the clients' momentum copies

    def __init__(self, args: argparse.Namespace, server: nn.Module, device: torch.device) -> None:
        """`server` is the server part of the network (backbone units after the cut and this method's head)."""
        super().__init__()
        self.server = server
        # True once `distribute` made this method one process of a torchrun run (never during __init__).
        self.distributed = False
        # The DDP wrapper of the server under torchrun; kept out of the module tree (see distribute).
        self._server_ddp: nn.Module | None = None

    # ------------------------------------------------------------------------------------------ class level
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the method's options (one argument group) to its entry script's parser."""

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Refuse impossible method options (UserError, one line) and fill derived values."""

    @classmethod
    def head_builder(cls, args: argparse.Namespace) -> "HeadBuilder":
        """What the server puts after the pooled backbone features (projection, predictor, prototypes)."""
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

    # ------------------------------------------------------------------------------------------ processes
    def distribute(self, runtime: Runtime) -> None:
        """Make this method one process of a torchrun run (the loop calls it once, before building the optimizer:
        the server's BatchNorm1d layers are replaced by global ones); `forward_server` then runs through DDP and
        `distributed` is True."""
        server_parameters = {id(parameter) for parameter in self.server.parameters()}
        if any(id(parameter) not in server_parameters for parameter in self.optimized_parameters()):
            raise TypeError(f"{type(self).__name__} trains parameters outside its server, whose gradients DDP would "
                            "not average over processes; put them in the head that head_builder returns")
        # Set past nn.Module's attribute hook: as a submodule the wrapper would add its keys to the state dicts.
        object.__setattr__(self, "_server_ddp", data_parallel(self.server, runtime))
        self.distributed = True

    def forward_server(self, inputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """`self.server` on `inputs`, through the DDP wrapper under torchrun so that its gradients are averaged over
        processes: every forward pass that trains the server goes through here."""
        return (self.server if self._server_ddp is None else self._server_ddp)(inputs)

    # ------------------------------------------------------------------------------------------- training
    def optimized_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.server.parameters() if p.requires_grad]

    def encode_features(self, smashed: torch.Tensor) -> torch.Tensor:
        """Backbone features of the server part (what the kNN and linear probes see)."""
        return self.server.features(smashed)

    def start_server_step(self) -> None:
        """Hook once per server step, before its first `compute_loss` (MoCo moves its momentum encoder here, as
        MocoSFL does before its forward passes)."""

    def compute_loss(self, smashed: Sequence[torch.Tensor], momentum_smashed: Sequence[torch.Tensor],
                     context: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise (the mean over this process's rows) and scalar statistics to log.

        smashed: one tensor per trainable crop, the rows of every client of this process (clients in layout order,
        the same images in every crop); momentum_smashed: the same for the momentum crops, without graph.
        """
        raise NotImplementedError

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
