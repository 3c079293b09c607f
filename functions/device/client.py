"""A real client: joins the server, then runs the tasks it is given on its own images until the server says stop.

    python -m functions.device --server HOST:PORT --client_id 3 --credentials certs/ [--data_dir ./data]

At join the server sends the run's options, the client's shard (dataset indices) and its state (weights, momentum
copy, optimizer buffers). Each step's task names the samples and augmentation keys; the device makes the views
itself (the same views the client would make in a simulated run), runs its part, and sends the smashed data; its
images never leave it. A lost server is retried with backoff for --retry_s seconds, then the device exits.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import nn

from functions.core.errors import UserError
from functions.data.datasets import download_allowed, load_dataset
from functions.data.views import ViewSpec
from functions.net.credentials import ClientCredentials
from functions.net.server import POLL_S, SERVICE
from functions.net.state import (
    buffer_numbers,
    client_state,
    load_client_state,
    prefixed,
    state_specs,
    unprefixed,
)
from functions.net.wire import Message, WireError, decode, encode, expect_tensors
from functions.sfl.clients.loop import momentum_update_
from models.split import build_split_model

logger = logging.getLogger("sfl.device")

MAX_RECEIVE_BYTES = 1 << 30  # the server is authenticated (TLS); its messages are still checked field by field
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


class Rejoin(Exception):
    """The server ended this device's session: join again."""


@dataclass
class Link:
    """The gRPC channel to the server and this device's identity on it."""

    server: str
    client_id: int
    credentials: ClientCredentials | None
    call_timeout_s: float

    def __post_init__(self) -> None:
        options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                   ("grpc.max_send_message_length", MAX_RECEIVE_BYTES)]
        if self.credentials is None:
            self.channel = grpc.insecure_channel(self.server, options=options)
        else:
            secure = grpc.ssl_channel_credentials(self.credentials.ca, self.credentials.key,
                                                  self.credentials.certificate)
            self.channel = grpc.secure_channel(self.server, secure, options=options)
        self._methods = {name: self.channel.unary_unary(f"/{SERVICE}/{name}") for name in ("Join", "Next", "Reply")}

    def call(self, method: str, payload: bytes, timeout_s: float | None = None) -> bytes:
        return self._methods[method](payload, timeout=timeout_s or self.call_timeout_s)

    def close(self) -> None:
        self.channel.close()


class Device:
    """The client's model, momentum copy, optimizer and images, built from the server's welcome."""

    def __init__(self, welcome: Message, data_dir: str) -> None:
        meta = welcome.meta
        options = argparse.Namespace(**meta["options"])
        self.client_id = welcome.client_id
        self.trainable_crops = [int(k) for k in meta["trainable_crops"]]
        self.momentum_crops = [int(k) for k in meta["momentum_crops"]]
        bottleneck = None if options.bottleneck_option == "None" else options.bottleneck_option
        split = build_split_model(options.arch, options.cutlayer, use_ws=not options.disable_WS,
                                  client_residual=not options.disable_c_residual, width=options.width,
                                  bottleneck=bottleneck, image_size=options.data_size)
        self.model = split.client
        self.momentum_model = None
        if self.momentum_crops:
            self.momentum_model = _frozen_copy(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0, momentum=options.momentum,
                                         weight_decay=options.weight_decay)
        self.load(welcome)
        dataset = load_dataset(options.dataset, data_dir, download=download_allowed(),
                               data_proportion=options.data_proportion, seed=options.seed, data_size=options.data_size)
        self.shard = {int(index) for index in meta["shard"]}
        view_spec = ViewSpec(**meta["view_spec"])
        from multicropdataset import FederatedViewsDataset, multicrop_transforms

        self.views = FederatedViewsDataset(dataset.train_images,
                                           multicrop_transforms(meta["mean"], meta["std"], view_spec))
        self._outputs: list[torch.Tensor] = []

    def load(self, message: Message) -> None:
        """Load a state the server sent, checked against this model first: weights, momentum copy, or both with the
        optimizer buffers (a whole state lists them in meta "buffers")."""
        parts = {name.split(".", 1)[0] for name in message.tensors}
        whole = "buffers" in message.meta
        expected = state_specs(self.model, "momentum" in parts and self.momentum_model is not None,
                               message.meta["buffers"] if whole else None)
        expected = {name: spec for name, spec in expected.items() if name.split(".", 1)[0] in parts}
        expect_tensors(message, expected)
        with torch.no_grad():
            if "model" in parts:
                self.model.load_state_dict(unprefixed("model", message.tensors))
            if "momentum" in parts and self.momentum_model is not None:
                self.momentum_model.load_state_dict(unprefixed("momentum", message.tensors))
        if whole:
            load_client_state(self.model, None, self.optimizer, message.tensors)

    def views_of(self, indices: Sequence[int], keys: Sequence[int]) -> list[torch.Tensor]:
        """The step's crops of this client's samples, augmented here from their keys."""
        outside = [i for i in indices if i not in self.shard]
        if outside:
            raise WireError(f"the server asked for samples {outside[:3]} outside this client's shard")
        samples = [self.views[(int(index), int(key))] for index, key in zip(indices, keys)]
        return [torch.stack([sample[k] for sample in samples]) for k in range(len(samples[0]))]

    def forward(self, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Momentum copy moved, then the smashed data of the trainable crops (graph kept) and of the momentum copy."""
        if self.momentum_model is not None and float(meta["momentum"]) > 0:
            momentum_update_(self.momentum_model, self.model, float(meta["momentum"]))
        self.optimizer.zero_grad(set_to_none=True)
        crops = self.views_of(meta["indices"], meta["keys"])
        self._outputs = [self.model(crops[k]) for k in self.trainable_crops]
        tensors = {f"smashed.{k}": output.detach() for k, output in zip(self.trainable_crops, self._outputs)}
        if self.momentum_model is not None:
            with torch.no_grad():
                tensors.update({f"momentum.{k}": self.momentum_model(crops[k]) for k in self.momentum_crops})
        return tensors

    def backward(self, message: Message) -> None:
        """The server's gradient rows into this client's graph, then one SGD step at the task's rate."""
        crops = [int(k) for k in message.meta["crops"]]
        position = {k: j for j, k in enumerate(self.trainable_crops)}
        expected = {f"gradient.{k}": (torch.float32, tuple(self._outputs[position[k]].shape)) for k in crops}
        for name, (dtype, shape) in expected.items():
            tensor = message.tensors.get(name)
            if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise WireError(f"gradient {name} does not fit this client's smashed data")
        outputs = [self._outputs[position[k]] for k in crops]
        torch.autograd.backward(outputs, [message.tensors[f"gradient.{k}"] for k in crops])
        for group in self.optimizer.param_groups:
            group["lr"] = float(message.meta["lr"])
        self.optimizer.step()
        self._outputs = []

    def state(self, whole: bool, momentum: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This client's weights (with momentum copy when asked), or its whole state."""
        if whole:
            tensors = client_state(self.model, self.momentum_model, self.optimizer)
            return tensors, {"buffers": buffer_numbers(tensors)}
        tensors = prefixed("model", self.model.state_dict())
        if momentum and self.momentum_model is not None:
            tensors.update(prefixed("momentum", self.momentum_model.state_dict()))
        return tensors, {}


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` that no optimizer moves (the momentum copy)."""
    frozen = copy.deepcopy(model)
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    return frozen


class DeviceLoop:
    """Join, work, rejoin when the session ends, retry a lost server for at most `retry_s` seconds."""

    def __init__(self, link: Link, data_dir: str, retry_s: float) -> None:
        self.link = link
        self.data_dir = data_dir
        self.retry_s = retry_s
        self.device: Device | None = None
        self.session = 0
        self.steps = 0

    def run(self) -> int:
        """Work until the server says stop (0); a credential refusal is a UserError; a lost server, exit 1."""
        last_contact = time.monotonic()
        delay = 0.2
        while True:
            try:
                if self.session == 0:
                    self.join()
                stopped = self.work()
                if stopped:
                    return 0
            except Rejoin:
                self.session = 0
                last_contact = time.monotonic()
            except grpc.RpcError as error:
                code = error.code()
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    raise UserError(f"the server refused client {self.link.client_id}: {error.details()}; check "
                                    "--client_id and --credentials") from None
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    self.session = 0
                    continue
                if code not in RETRYABLE and code != grpc.StatusCode.CANCELLED:
                    raise UserError(f"the server answered {code.name}: {error.details()}") from None
                if time.monotonic() - last_contact > self.retry_s:
                    logger.error(f"client {self.link.client_id}: no server at {self.link.server} for "
                                 f"{self.retry_s:g} s ({code.name}: {error.details()}); giving up")
                    return 1
                self.session = 0
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            last_contact = time.monotonic()

    def join(self) -> None:
        request = encode(Message("join", self.link.client_id))
        welcome = decode(self.link.call("Join", request, timeout_s=60.0), MAX_RECEIVE_BYTES // 4)
        if welcome.kind != "welcome" or welcome.client_id != self.link.client_id:
            raise WireError(f"expected a welcome for client {self.link.client_id}, got {welcome.kind}")
        if self.device is None:
            self.device = Device(welcome, self.data_dir)
        else:
            self.device.load(welcome)
        self.session = welcome.session
        logger.info(f"client {self.link.client_id} joined (session {self.session})")

    def work(self) -> bool:
        """Run tasks until the server says stop (True) or the session ends (Rejoin)."""
        assert self.device is not None
        while True:
            ask = encode(Message("next", self.link.client_id, self.session))
            task = decode(self.link.call("Next", ask, timeout_s=POLL_S + self.link.call_timeout_s),
                          MAX_RECEIVE_BYTES // 4)
            if task.session != self.session or task.client_id != self.link.client_id:
                raise Rejoin()
            if task.kind == "idle":
                continue
            if task.kind == "stop":
                logger.info(f"client {self.link.client_id}: training is done ({self.steps} steps here)")
                return True
            started = time.perf_counter()
            kind, tensors, meta = self.handle(task)
            meta["compute_s"] = time.perf_counter() - started
            reply = encode(Message(kind, self.link.client_id, self.session, task.seq, meta, tensors))
            self.link.call("Reply", reply)

    def handle(self, task: Message) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        """One task's answer: (kind, tensors, meta)."""
        device = self.device
        if task.kind == "forward":
            self.steps += 1
            return "smashed", device.forward(task.meta), {}
        if task.kind == "backward":
            device.backward(task)
            return "stepped", {}, {}
        if task.kind == "weights":
            tensors, meta = device.state(False, bool(task.meta.get("momentum")))
            return "weights", tensors, meta
        if task.kind == "state":
            tensors, meta = device.state(True, True)
            return "state", tensors, meta
        if task.kind == "load":
            device.load(task)
            return "loaded", {}, {}
        raise WireError(f"unknown task {task.kind}")


def device_main(server: str, client_id: int, credentials: Path | None, data_dir: str, retry_s: float,
                call_timeout_s: float, threads: int) -> int:
    """Run one device until the server says stop; returns the exit code."""
    torch.set_num_threads(max(1, threads))
    link = Link(server, client_id, None if credentials is None else ClientCredentials.read(credentials, client_id),
                call_timeout_s)
    try:
        return DeviceLoop(link, data_dir, retry_s).run()
    finally:
        link.close()

