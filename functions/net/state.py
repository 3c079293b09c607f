"""One client's state as named tensors for the wire: its model ("model.<name>"), its momentum copy
("momentum.<name>") and its SGD momentum buffers ("optimizer.<parameter number>"), and loading them back.

Server and device read and write the same names, so a client's state crosses the network and back unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from functions.net.wire import TensorSpec, WireError, specs_of


def prefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors under names "<prefix>.<name>"."""
    return {f"{prefix}.{name}": tensor for name, tensor in tensors.items()}


def unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors named "<prefix>.<name>", by <name>."""
    start = len(prefix) + 1
    return {name[start:]: tensor for name, tensor in tensors.items() if name.startswith(prefix + ".")}


def optimizer_buffers(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The SGD momentum buffer of every parameter that has one, by the parameter's number."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    buffers = {}
    for number, parameter in enumerate(parameters):
        buffer = optimizer.state.get(parameter, {}).get("momentum_buffer")
        if buffer is not None:
            buffers[str(number)] = buffer
    return buffers


def client_state(model: nn.Module, momentum_model: nn.Module | None,
                 optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """A client's whole state as named tensors (momentum copy and optimizer when given)."""
    tensors = prefixed("model", model.state_dict())
    if momentum_model is not None:
        tensors.update(prefixed("momentum", momentum_model.state_dict()))
    if optimizer is not None:
        tensors.update(prefixed("optimizer", optimizer_buffers(optimizer)))
    return tensors


def state_specs(model: nn.Module, momentum: bool, buffers: list[int] | None) -> dict[str, TensorSpec]:
    """What a client's state must look like: its model's tensors, its momentum copy's (the same), and the momentum
    buffers of the listed parameters (each the shape of its parameter)."""
    model_specs = specs_of(model.state_dict())
    specs = {f"model.{name}": spec for name, spec in model_specs.items()}
    if momentum:
        specs.update({f"momentum.{name}": spec for name, spec in model_specs.items()})
    if buffers is not None:
        parameters = list(model.parameters())
        for number in buffers:
            if not isinstance(number, int) or not 0 <= number < len(parameters):
                raise WireError(f"optimizer buffer {number!r} names no parameter")
            specs[f"optimizer.{number}"] = TensorSpec(parameters[number].dtype, tuple(parameters[number].shape))
    return specs


def buffer_numbers(tensors: Mapping[str, torch.Tensor]) -> list[int]:
    """The parameter numbers of the optimizer buffers among `tensors`."""
    return sorted(int(name) for name in unprefixed("optimizer", tensors))


@torch.no_grad()
def load_client_state(model: nn.Module, momentum_model: nn.Module | None, optimizer: torch.optim.Optimizer | None,
                      tensors: Mapping[str, torch.Tensor]) -> None:
    """Load what `tensors` holds: the model, the momentum copy when present, and with an optimizer every momentum
    buffer (a parameter without one in `tensors` has none: SGD starts it at its next step)."""
    model.load_state_dict(unprefixed("model", tensors))
    momentum_state = unprefixed("momentum", tensors)
    if momentum_model is not None and momentum_state:
        momentum_model.load_state_dict(momentum_state)
    if optimizer is None:
        return
    buffers = unprefixed("optimizer", tensors)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for number, parameter in enumerate(parameters):
        buffer = buffers.get(str(number))
        if buffer is None:
            optimizer.state.pop(parameter, None)
        else:
            optimizer.state[parameter] = {"momentum_buffer": buffer.to(parameter.device, parameter.dtype).clone()}
