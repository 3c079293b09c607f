"""The server-method interface of the one training loop, and the registry of methods by name.

A method (MoCo, SwAV, ...) is one class in one module: its options, its head, its views, its loss and its state.
It registers itself with `@register_method(name, ...)`; the loop, the options, the models and the benchmark only ever ask
the registry, never a method's name. Modules named ``functions/sfl<name>_functions.py`` are imported the first time
the registry is read, so their methods are known to every entry point; a method defined elsewhere (a test, a
notebook) is known once its module has been imported.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence, TypeVar

import numpy as np
import torch
from torch import nn

from functions.errors import UserError
from functions.schedules import LearningRateSchedule
from functions.views import ViewSpec

if TYPE_CHECKING:
    from functions.datasets import DatasetEntry
    from models.split import HeadBuilder

METHOD_MODULE_PREFIX = "sfl"
METHOD_MODULE_SUFFIX = "_functions"


@dataclass(frozen=True)
class StepLayout:
    """Which clients sent the rows of a step: this process's rows (client_ids, rows_per_client, in the order of the
    smashed data) and the rows of the whole pool (pool_ids, pool_rows: every process's, in the order keys gathered
    over processes arrive; the same as the local ones in a single process)."""

    client_ids: tuple[int, ...]
    rows_per_client: tuple[int, ...]
    pool_ids: tuple[int, ...]
    pool_rows: tuple[int, ...]

    @classmethod
    def single(cls) -> "StepLayout":
        """No layout yet (before the first step)."""
        return cls((), (), (), ())

    @classmethod
    def of(cls, client_ids: Sequence[int], rows_per_client: Sequence[int], pool_ids: Sequence[int] | None = None,
           pool_rows: Sequence[int] | None = None) -> "StepLayout":
        """A step's layout; without a pool, the local clients are the whole pool (one process)."""
        local = tuple(int(c) for c in client_ids), tuple(int(r) for r in rows_per_client)
        pool = local if pool_ids is None else (tuple(int(c) for c in pool_ids), tuple(int(r) for r in pool_rows or ()))
        return cls(*local, *pool)

    @staticmethod
    def _blocks(ids: Sequence[int], rows: Sequence[int]) -> list[tuple[int, int, int]]:
        offsets = np.concatenate([[0], np.cumsum(rows)]).astype(int).tolist()
        return [(client, offsets[j], offsets[j + 1]) for j, client in enumerate(ids)]

    def local_blocks(self) -> list[tuple[int, int, int]]:
        """(client, first row, end row) of each of this process's clients."""
        return self._blocks(self.client_ids, self.rows_per_client)

    def pool_blocks(self) -> list[tuple[int, int, int]]:
        """(client, first row, end row) of each pool client in the gathered rows."""
        return self._blocks(self.pool_ids, self.pool_rows)


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
METHODS: dict[str, type[ServerMethod]] = {}
Method = TypeVar("Method", bound=ServerMethod)
_method_modules_loaded = False


def register_method(name: str, *, entry_script: str = "",
                    description: str = "") -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a ServerMethod known as `name`, run by `entry_script`, described in --help by
    `description` (a later registration of the name replaces the earlier one)."""
    def register(method: type[Method]) -> type[Method]:
        if not (isinstance(method, type) and issubclass(method, ServerMethod)):
            raise TypeError("register_method decorates ServerMethod subclasses")
        method.name, method.entry_script, method.description = name, entry_script, description
        METHODS[name] = method
        return method

    return register


def _load_method_modules() -> None:
    """Import every functions/sfl<name>_functions.py once, so the methods they register are known."""
    global _method_modules_loaded
    if _method_modules_loaded:
        return
    _method_modules_loaded = True
    folder = Path(__file__).resolve().parent
    for module in sorted(pkgutil.iter_modules([str(folder)]), key=lambda info: info.name):
        if module.name.startswith(METHOD_MODULE_PREFIX) and module.name.endswith(METHOD_MODULE_SUFFIX):
            importlib.import_module(f"functions.{module.name}")


def method_names() -> list[str]:
    """Names of every registered method."""
    _load_method_modules()
    return sorted(METHODS)


def method_class(name: str) -> type[ServerMethod]:
    """The method registered as `name`; a UserError naming the known ones otherwise."""
    _load_method_modules()
    method = METHODS.get(name)
    if method is None:
        raise UserError(f"unknown method {name!r}; the registered methods are {', '.join(sorted(METHODS))}")
    return method
