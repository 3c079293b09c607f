"""Clients on other machines inside a normal run: a client engine that sends the remote clients' work over the
network and keeps the simulated ones in the local (loop) engine.

The local engine keeps a copy (mirror) of every remote client's state: FedAvg and checkpoints read it as they read
a simulated client's, so averaging, checkpoint_last.pt and evaluation need nothing new. The mirror is brought up to
date from the device when it is read (weights before FedAvg, the whole state before a checkpoint) and pushed to the
device when it is written (the FedAvg average, a resumed checkpoint); a device that joins gets it whole.

Per step, before the server's half: every connected remote client of the pool gets the step's sample indices and
augmentation keys (its images never leave it), moves its momentum copy, runs its part on its own views, and sends
the smashed data (and its momentum copy's). A client that does not answer in time, or answers wrongly, is left out
of that step (its rows are not in the loss) and of the next FedAvg until it joins again. After the server's
backward, each remote client with a learning rate above 0 gets its gradient rows and steps (--c_lr 0: upload only).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from functions.core.errors import UserError
from functions.core.logs import TrainingLog
from functions.data.loaders import FederatedSchedule, StepBatch
from functions.data.views import ViewSpec
from functions.net.credentials import ServerCredentials
from functions.net.options import remote_client_ids
from functions.net.server import HEADER_SLACK_BYTES, DeviceServer
from functions.net.state import (
    buffer_numbers,
    client_state,
    load_client_state,
    prefixed,
    state_specs,
)
from functions.net.wire import Message, TensorSpec, WireError, encode
from functions.sfl.clients.loop import ClientSide, query_index
from models.split import smashed_row_shape

logger = logging.getLogger("sfl")


@dataclass
class StepCosts:
    """What one remote client paid during one step: bytes each way, round trips and its own compute time."""

    bytes_up: int = 0
    bytes_down: int = 0
    round_trip_s: float = 0.0
    compute_s: float = 0.0


@dataclass(frozen=True)
class DeviceSettings:
    """What a device needs to know to work for this run (sent when it joins)."""

    options: dict[str, Any]
    view_spec: ViewSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    trainable_crops: tuple[int, ...]
    momentum_crops: tuple[int, ...]
    gradient_crops: tuple[int, ...] | None
    client_momentum: float
    shards: dict[int, list[int]] = field(repr=False)

    def meta(self, client: int) -> dict[str, Any]:
        """The JSON the device receives with its state."""
        return {"options": json.loads(json.dumps(self.options, default=str)),
                "view_spec": dataclasses.asdict(self.view_spec), "mean": list(self.mean), "std": list(self.std),
                "trainable_crops": list(self.trainable_crops), "momentum_crops": list(self.momentum_crops),
                "gradient_crops": None if self.gradient_crops is None else list(self.gradient_crops),
                "client_momentum": self.client_momentum, "shard": self.shards[client]}


class NetworkedClients:
    """The client engine of a run with remote clients: the loop engine for the simulated ones (and the mirrors),
    the device server for the remote ones. SplitStep, FedAvg and the Trainer see one engine."""

    def __init__(self, local: ClientSide, remote_ids: Sequence[int], server: DeviceServer | None,
                 settings: DeviceSettings, schedule: FederatedSchedule, *, client_timeout: float, join_timeout: float) -> None:
        self.local = local
        self.remote_ids = sorted(int(c) for c in remote_ids)
        self.server = server
        self.settings = settings
        self.schedule = schedule
        self.client_timeout = client_timeout
        self.join_timeout = join_timeout
        self.log: TrainingLog | None = None
        self.rates = [0.0] * local.num_client
        self._joined_once = False
        self._smashed: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._rows: list[int] = []
        self._ids: list[int] = []
        self._backward_posted: list[int] = []
        self._costs: dict[int, StepCosts] = {}
        self._global_step = 0
        self._output_shapes: dict[int, tuple[int, ...]] = {}

    # ------------------------------------------------------------------------------------------- the mirror
    @property
    def num_client(self) -> int:
        return self.local.num_client

    def is_remote(self, client: int) -> bool:
        return client in self.remote_ids

    def local_clients(self, pool: Sequence[int]) -> list[int]:
        """The simulated clients of a pool."""
        return [c for c in pool if not self.is_remote(c)]

    def _momentum_model(self, client: int) -> nn.Module | None:
        return self.local.momentum_models[client] if self.local.momentum_models else None

    def _whole_state(self, client: int) -> dict[str, torch.Tensor]:
        return client_state(self.local.models[client], self._momentum_model(client), self.local.optimizers[client])

    def _whole_state_specs(self, client: int) -> Callable[[Message], dict[str, TensorSpec]]:
        """A whole state's expected tensors: the buffers the message lists must each fit their parameter."""
        def expected(message: Message) -> dict[str, TensorSpec]:
            numbers = message.meta.get("buffers")
            if not isinstance(numbers, list):
                raise WireError("a state must list its optimizer buffers")
            return state_specs(self.local.models[client], bool(self.local.momentum_models), numbers)
        return expected

    def _answer_join(self, client: int, session: int) -> bytes:
        tensors = self._whole_state(client)
        meta = {**self.settings.meta(client), "buffers": buffer_numbers(tensors)}
        return encode(Message("welcome", client, session, 0, meta, tensors))

    def serve_joins(self) -> None:
        """Answer the devices waiting to join (the first time: wait for every remote client, up to --join_timeout)."""
        if not self._joined_once:
            self._joined_once = True
            waiting = [c for c in self.remote_ids if not self.server.connected(c)]
            if waiting:
                logger.info(f"waiting up to {self.join_timeout:g} s for remote clients {waiting} to join")
            self.server.wait_for_joins(self.remote_ids, time.monotonic() + self.join_timeout, self._answer_join)
            missing = [c for c in self.remote_ids if not self.server.connected(c)]
            if missing:
                logger.warning(f"remote clients {missing} did not join within --join_timeout; training without them "
                               "until they do")
            return
        self.server.wait_for_joins([], 0.0, self._answer_join)

    def _exchange(self, clients: Sequence[int], what: str, post: Callable[[int], int]) -> dict[int, Message]:
        """Post a task to each connected client, then collect the answers (one deadline for all)."""
        posted = []
        for client in clients:
            sent = post(client)
            if sent:
                self._cost(client).bytes_down += sent
                posted.append(client)
        deadline = time.monotonic() + self.client_timeout
        answers = {}
        for client in posted:
            reply, size, round_trip = self.server.wait(client, deadline, what)
            if reply is None:
                continue
            costs = self._cost(client)
            costs.bytes_up += size
            costs.round_trip_s += round_trip
            compute = reply.meta.get("compute_s", 0.0)
            costs.compute_s += float(compute) if isinstance(compute, (int, float)) and np.isfinite(compute) else 0.0
            answers[client] = reply
        return answers

    def _cost(self, client: int) -> StepCosts:
        return self._costs.setdefault(client, StepCosts())

    def _connected(self, clients: Sequence[int]) -> list[int]:
        if self.server is None:  # closed
            return []
        return [c for c in clients if self.is_remote(c) and self.server.connected(c)]

    @torch.no_grad()
    def _pull(self, clients: Sequence[int], whole: bool, momentum_copies: bool, what: str) -> list[int]:
        """Bring the mirrors of the connected `clients` up to date from their devices; returns those that answered."""
        def post(client: int) -> int:
            if whole:
                return self.server.post(client, "state", {}, {}, "state", self._whole_state_specs(client))
            model = self.local.models[client]
            expected = state_specs(model, momentum_copies, None)
            return self.server.post(client, "weights", {"momentum": momentum_copies}, {}, "weights", expected)

        answers = self._exchange(self._connected(clients), what, post)
        for client, reply in answers.items():
            optimizer = self.local.optimizers[client] if whole else None
            load_client_state(self.local.models[client], self._momentum_model(client), optimizer, reply.tensors)
        return sorted(answers)

    def _push(self, clients: Sequence[int], tensors_of: Callable[[int], dict[str, torch.Tensor]], what: str,
              whole: bool = False) -> None:
        """Send state to the connected `clients` (a whole state lists its optimizer buffers; the device then
        takes exactly those)."""
        def post(client: int) -> int:
            tensors = tensors_of(client)
            meta = {"buffers": buffer_numbers(tensors)} if whole else {}
            return self.server.post(client, "load", meta, tensors, "loaded", {})

        self._exchange(self._connected(clients), what, post)

    def available_for_fedavg(self, pool: Sequence[int], momentum_copies: bool) -> list[int]:
        """The pool's clients whose weights FedAvg can average now: the simulated ones and the remote ones that
        sent their weights (their mirrors then hold them)."""
        self.serve_joins()
        answered = set(self._pull([c for c in pool if self.is_remote(c)], False, momentum_copies, "FedAvg"))
        kept = [c for c in pool if not self.is_remote(c) or c in answered]
        if len(kept) < len(pool):
            logger.info(f"FedAvg of step {self._global_step} without remote clients "
                        f"{sorted(set(pool) - set(kept))} (not connected); they get the average when they join")
        self._log_costs()
        return kept

    # --------------------------------------------------------------------------------- the step's data
    def _output_shape(self, size: int) -> tuple[int, ...]:
        """The shape of one row of smashed data for a crop of `size` pixels."""
        if size not in self._output_shapes:
            self._output_shapes[size] = smashed_row_shape(self.local.models[0], size)
        return self._output_shapes[size]

    def _forward_specs(self, rows: int) -> dict[str, TensorSpec]:
        crops = self.settings.view_spec.crops()
        specs = {f"smashed.{k}": TensorSpec(torch.float32, (rows, *self._output_shape(crops[k][0])))
                 for k in self.settings.trainable_crops}
        specs.update({f"momentum.{k}": TensorSpec(torch.float32, (rows, *self._output_shape(crops[k][0])))
                      for k in self.settings.momentum_crops})
        return specs

    def gather(self, batch: StepBatch, epoch: int, step: int, global_step: int, pool: Sequence[int]) -> StepBatch:
        """The step's batch with the remote clients that answered: their sample indices, placeholder crop rows
        (their views stay on the device) and their smashed data kept for forward()."""
        self.serve_joins()
        self._global_step = global_step + 1
        remote = self._connected([c for c in pool if self.is_remote(c)])
        plans = {client: (indices, keys) for client, indices, keys in self.schedule.step_plan(epoch, step, remote)}

        def post(client: int) -> int:
            indices, keys = plans[client]
            meta = {"epoch": epoch, "step": step, "global_step": global_step, "indices": indices.tolist(),
                    "keys": [int(k) for k in keys.tolist()], "momentum": self.settings.client_momentum}
            return self.server.post(client, "forward", meta, {}, "smashed", self._forward_specs(len(indices)))

        answers = self._exchange(remote, f"step {global_step + 1}", post)
        self._smashed = {client: ([reply.tensors[f"smashed.{k}"] for k in self.settings.trainable_crops],
                                  [reply.tensors[f"momentum.{k}"] for k in self.settings.momentum_crops])
                         for client, reply in answers.items()}
        return merged_batch(batch, {c: plans[c][0] for c in answers}, pool)

    # ------------------------------------------------------------------------------ the engine interface
    def _split(self, client_ids: Sequence[int],
               rows_per_client: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """The local clients, their rows, and the batch rows that are theirs."""
        offsets = query_index(rows_per_client)
        ids, rows, index = [], [], []
        for j, client in enumerate(client_ids):
            if not self.is_remote(client):
                ids.append(client)
                rows.append(rows_per_client[j])
                index.extend(range(offsets[j], offsets[j + 1]))
        return ids, rows, index

    def _assemble(self, local_out: Sequence[torch.Tensor], remote_out: Callable[[int], Sequence[torch.Tensor]],
                  client_ids: Sequence[int], local_rows: Sequence[int]) -> list[torch.Tensor]:
        """Per crop, the clients' rows in batch order from the local outputs and the remote ones."""
        local_offsets = query_index(local_rows)
        per_crop: list[list[torch.Tensor]] = [[] for _ in local_out] if local_out else []
        j = 0
        for client in client_ids:
            if self.is_remote(client):
                outputs = [t.to(self.local_device) for t in remote_out(client)]
            else:
                outputs = [out[local_offsets[j]:local_offsets[j + 1]] for out in local_out]
                j += 1
            if not per_crop:
                per_crop = [[] for _ in outputs]
            for k, output in enumerate(outputs):
                per_crop[k].append(output)
        return [torch.cat(chunks) for chunks in per_crop]

    @property
    def local_device(self) -> torch.device:
        return next(self.local.models[0].parameters()).device

    def forward(self, crops: Sequence[torch.Tensor], client_ids: Sequence[int],
                rows_per_client: Sequence[int]) -> list[torch.Tensor]:
        ids, rows, index = self._split(client_ids, rows_per_client)
        self._ids, self._rows = list(client_ids), list(rows_per_client)
        local_out: list[torch.Tensor] = []
        if ids:
            rows_index = torch.tensor(index, device=crops[0].device)
            local_out = self.local.forward([crop.index_select(0, rows_index) for crop in crops], ids, rows)
        return self._assemble(local_out, lambda c: self._smashed[c][0], client_ids, rows)

    @torch.no_grad()
    def momentum_forward(self, crops: Sequence[torch.Tensor], client_ids: Sequence[int],
                         rows_per_client: Sequence[int]) -> list[torch.Tensor]:
        ids, rows, index = self._split(client_ids, rows_per_client)
        local_out: list[torch.Tensor] = []
        if ids:
            rows_index = torch.tensor(index, device=crops[0].device)
            local_out = self.local.momentum_forward([crop.index_select(0, rows_index) for crop in crops], ids, rows)
        return self._assemble(local_out, lambda c: self._smashed[c][1], client_ids, rows)

    def backward(self, gradients: Sequence[torch.Tensor | None]) -> None:
        """Gradient rows to the remote clients that learn (lr > 0), then the local backward."""
        offsets = query_index(self._rows)
        remote = [(j, c) for j, c in enumerate(self._ids) if self.is_remote(c) and self.rates[c] > 0]
        sent_crops = [k for k, gradient in zip(self.settings.trainable_crops, gradients) if gradient is not None]

        def post(client: int) -> int:
            j = self._ids.index(client)
            tensors = {f"gradient.{k}": gradient[offsets[j]:offsets[j + 1]].float()
                       for k, gradient in zip(self.settings.trainable_crops, gradients) if gradient is not None}
            return self.server.post(client, "backward", {"lr": self.rates[client], "crops": sent_crops}, tensors,
                                    "stepped", {})

        self._backward_posted = []
        for _, client in remote:
            sent = post(client)
            if sent:
                self._cost(client).bytes_down += sent
                self._backward_posted.append(client)
        _, _, index = self._split(self._ids, self._rows)
        if any(not self.is_remote(c) for c in self._ids):
            rows_index = torch.tensor(index, device=self.local_device)
            self.local.backward([g.index_select(0, rows_index) if g is not None else None for g in gradients])

    def step(self, client_ids: Sequence[int], scaler: torch.amp.GradScaler) -> None:
        """The local clients' optimizer steps; then the remote clients' acknowledgements (they stepped)."""
        self.local.step(self.local_clients(client_ids), scaler)
        deadline = time.monotonic() + self.client_timeout
        for client in self._backward_posted:
            reply, size, round_trip = self.server.wait(client, deadline, f"step {self._global_step}")
            if reply is not None:
                costs = self._cost(client)
                costs.bytes_up += size
                costs.round_trip_s += round_trip
                compute = reply.meta.get("compute_s", 0.0)
                costs.compute_s += float(compute) if isinstance(compute, (int, float)) else 0.0
        self._backward_posted = []
        self._smashed = {}
        self._log_costs()

    def forget_outputs(self) -> None:
        self.local.forget_outputs()
        self._smashed = {}
        self._log_costs()

    def zero_grad(self, client_ids: Sequence[int]) -> None:
        self.local.zero_grad(self.local_clients(client_ids))

    def update_momentum_copies(self, client_ids: Sequence[int], momentum: float) -> None:
        # A remote client moves its own copy as its forward task begins.
        self.local.update_momentum_copies(self.local_clients(client_ids), momentum)

    def set_lr(self, lr: float | Sequence[float]) -> None:
        self.local.set_lr(lr)
        self.rates = [float(lr)] * self.num_client if isinstance(lr, (int, float)) else [float(r) for r in lr]

    def stacked_state(self, client_ids: Sequence[int], momentum_copies: bool = False) -> dict[str, torch.Tensor]:
        return self.local.stacked_state(client_ids, momentum_copies)

    def set_every_client(self, state: dict[str, torch.Tensor], momentum_copies: bool = False) -> None:
        """Every client (mirrors too) loads `state`; the connected remote clients get it over the network."""
        self.local.set_every_client(state, momentum_copies)
        prefix = "momentum" if momentum_copies else "model"
        self._push(self.remote_ids, lambda c: prefixed(prefix, (self._momentum_model(c) if momentum_copies
                                                                else self.local.models[c]).state_dict()),
                   "the FedAvg average")
        self._log_costs()

    def set_clients(self, client_ids: Sequence[int], stacked: dict[str, torch.Tensor]) -> None:
        self.local.set_clients(client_ids, stacked)
        self._push([c for c in client_ids if self.is_remote(c)],
                   lambda c: prefixed("model", self.local.models[c].state_dict()), "a personalised average")

    def module_with(self, state: dict[str, torch.Tensor]) -> nn.Module:
        return self.local.module_with(state)

    def state_dict(self) -> dict:
        """The loop engine's state, the remote clients' part fetched from their devices first."""
        self._pull(self.remote_ids, True, False, "the checkpoint")
        return self.local.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.local.load_state_dict(state)
        self._push(self.remote_ids, self._whole_state, "a restored state", whole=True)

    # ------------------------------------------------------------------------------------------- costs
    def _log_costs(self) -> None:
        """Per remote client, what this step cost it: metrics.json and tensorboard (device/<id>/...)."""
        if self.log is not None:
            for client, costs in sorted(self._costs.items()):
                for name, value in dataclasses.asdict(costs).items():
                    self.log.metrics.append(f"device/{client}/{name}", self._global_step, value)
                    self.log.tensorboard.scalar(f"device/{client}/{name}", value, self._global_step)
        self._costs = {}

    def close(self, done: bool) -> None:
        """Stop serving (once); when training is done, tell the connected devices to stop."""
        if self.server is None:
            return
        if done:
            for client in self._connected(self.remote_ids):
                self.server.post(client, "stop", {}, {}, "bye", {})
            deadline = time.monotonic() + min(self.client_timeout, 5.0)
            while any(self.server.slots[c].task is not None and not self.server.slots[c].task.delivered
                      for c in self._connected(self.remote_ids)) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.server.stop()
        self.server = None


def merged_batch(batch: StepBatch, remote_indices: dict[int, np.ndarray], pool: Sequence[int]) -> StepBatch:
    """The local batch with the answering remote clients' rows in pool order: their sample indices, and zero
    placeholders in the crops (the clients' engine never reads them)."""
    local_offsets = query_index(batch.rows_per_client)
    position = {client: j for j, client in enumerate(batch.client_ids)}
    clients, rows, indices = [], [], []
    crops: list[list[torch.Tensor]] = [[] for _ in batch.crops]
    for client in pool:
        if client in position:
            j = position[client]
            chunk = slice(local_offsets[j], local_offsets[j + 1])
            count = batch.rows_per_client[j]
            indices.append(batch.sample_indices[chunk])
            for k, crop in enumerate(batch.crops):
                crops[k].append(crop[chunk])
        elif client in remote_indices:
            count = len(remote_indices[client])
            indices.append(torch.from_numpy(np.asarray(remote_indices[client], dtype=np.int64)))
            for k, crop in enumerate(batch.crops):
                crops[k].append(crop.new_zeros(1, *crop.shape[1:]).expand(count, *crop.shape[1:]))
        else:
            continue
        clients.append(client)
        rows.append(count)
    return StepBatch([torch.cat(parts) for parts in crops], clients, rows,
                     torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64))


def message_limit_bytes(local: ClientSide, settings: DeviceSettings, rows: int,
                        output_values: Callable[[int], int]) -> int:
    """The largest message a remote client may send: a step's smashed data or its whole state (8 bytes a value,
    so float64 counters fit too), plus room for the header."""
    crops = settings.view_spec.crops()
    smashed = rows * sum(output_values(crops[k][0]) for k in (*settings.trainable_crops, *settings.momentum_crops))
    state = 3 * sum(tensor.numel() for tensor in local.models[0].state_dict().values())
    return 8 * max(smashed, state) + HEADER_SLACK_BYTES


def build_networked_clients(args: Any, local: Any, data: Any, view_spec: ViewSpec, method: Any,
                            runtime: Any, options: dict[str, Any]) -> NetworkedClients | None:
    """The networked engine around the run's loop engine when the options name remote clients (None otherwise):
    the device server listens on --listen from here on."""
    remote = remote_client_ids(args)
    if not remote or getattr(args, "eval_only", False):
        return None
    if runtime.is_distributed:
        raise UserError("remote clients (--remote_clients) join a single-process run; start it without torchrun")
    if not isinstance(local, ClientSide):
        raise UserError("remote clients need the loop client engine: drop --client_exec vmap")
    dataset = data.dataset
    settings = DeviceSettings(options, view_spec, tuple(dataset.mean), tuple(dataset.std),
                              tuple(method.trainable_crops), tuple(method.momentum_crops),
                              None if method.gradient_crops is None else tuple(method.gradient_crops),
                              float(method.client_momentum),
                              {c: [int(i) for i in data.client_indices[c]] for c in remote})
    credentials = None if args.insecure else ServerCredentials.read(Path(args.credentials))
    probe = NetworkedClients(local, remote, None, settings, data.schedule, client_timeout=args.client_timeout,
                             join_timeout=args.join_timeout)
    limit = message_limit_bytes(local, settings, max(data.batch_sizes[c] for c in remote),
                                lambda size: int(np.prod(probe._output_shape(size))))
    try:
        server = DeviceServer(args.listen, remote, limit, credentials)
    except RuntimeError as error:
        raise UserError(f"--listen {args.listen}: cannot listen there ({error}); choose a free port") from None
    if server.port == 0:
        raise UserError(f"--listen {args.listen}: cannot listen there; choose a free port and an address of this "
                        "machine")
    probe.server = server
    security = "plain text (--insecure)" if credentials is None else "mutual TLS"
    logger.info(f"remote clients {remote} join on {args.listen.rsplit(':', 1)[0]}:{server.port} ({security}); "
                f"messages up to {limit} bytes")
    return probe
