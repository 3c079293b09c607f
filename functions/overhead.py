"""What one client sends, receives, computes and holds (MocoSFL's overhead_calculator.py, for this collection's models).

Every run logs these figures at its start and keeps them in metrics.json ("overhead"); alone:

    python -m functions.overhead --cutlayer 2 --batch_size 1          # any option of run_sflmoco.py
    python -m functions.overhead --method swav --cutlayer 1 2 3       # several cut layers side by side

Per client and step (one batch of --batch_size images): the smashed data sent up (the rows of every crop the client
model runs, including its momentum copy's for MoCo), the gradient rows received (crops that send gradients), the
client's FLOPs (forward, backward and momentum forward, counted by torch's FlopCounterMode), and its memory
(weights, momentum copy, SGD momentum, and the activations of one step). Per FedAvg round, the client's weights go
up and the average comes back. With --scheme fl there is no smashed data and the whole network is the client's.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from functions.datasets import dataset_entry
from functions.errors import run_cli
from functions.server_method import method_class
from models.split import build_split_model, build_unsplit_model

BYTES_PER_VALUE = 4  # float32 on the wire and in memory (halve for fp16 smashed data)


@dataclass(frozen=True)
class ClientOverhead:
    """One client's costs: per step (bytes, FLOPs), per FedAvg round (bytes) and held (bytes)."""

    cutlayer: int
    batch_size: int
    smashed_up_bytes: int
    gradient_down_bytes: int
    client_flops_per_step: int
    client_parameters: int
    client_memory_bytes: int
    fedavg_round_bytes: int


def _activation_values(model: nn.Module, inputs: torch.Tensor) -> int:
    """Values of every leaf module's output in one forward: what autograd keeps for the backward, about."""
    counted = [0]

    def count(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            counted[0] += output.numel()

    handles = [module.register_forward_hook(count) for module in model.modules() if not list(module.children())]
    try:
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counted[0]


def client_overhead(args: argparse.Namespace) -> ClientOverhead:
    """The costs of one client under these run options (built on the CPU, nothing trained)."""
    method_cls = method_class(args.method)
    dataset = dataset_entry(args.dataset)
    views = method_cls.view_spec(args, dataset).crops()
    federated = getattr(args, "scheme", "sfl") == "fl"
    with torch.random.fork_rng(devices=[]):
        if federated:
            model = build_unsplit_model(args.arch, head=method_cls.head_builder(args), use_ws=not args.disable_WS,
                                        width=args.width)
        else:
            model = build_split_model(args.arch, args.cutlayer, head=method_cls.head_builder(args),
                                      use_ws=not args.disable_WS, client_residual=not args.disable_c_residual,
                                      width=args.width).client
        method = method_cls if federated else None
    trainable = (0, 1) if federated else _crops_of(method_cls, args, "trainable_crops")
    momentum = (0, 1) if federated else _crops_of(method_cls, args, "momentum_crops")
    batch = args.batch_size
    up = down = flops = activations = 0
    model.train()
    for index, (size, _) in enumerate(views):
        images = torch.randn(batch, 3, size, size)
        runs_online, runs_momentum = index in trainable, index in momentum
        if not (runs_online or runs_momentum):
            continue
        with FlopCounterMode(display=False) as counter:
            output = model(images)
        forward = counter.get_total_flops()
        if runs_online:
            with FlopCounterMode(display=False) as counter:
                output.backward(torch.ones_like(output))
            flops += forward + counter.get_total_flops()
            activations += _activation_values(model, images)
            down += 0 if federated else output.numel()
        if runs_momentum:
            flops += forward
        up += 0 if federated else output.numel() * (int(runs_online) + int(runs_momentum))
    parameters = sum(p.numel() for p in model.parameters())
    copies = 3 if momentum else 2  # weights and SGD momentum, plus the momentum copy when the method keeps one
    del method
    return ClientOverhead(cutlayer=0 if federated else args.cutlayer, batch_size=batch,
                          smashed_up_bytes=up * BYTES_PER_VALUE, gradient_down_bytes=down * BYTES_PER_VALUE,
                          client_flops_per_step=int(flops), client_parameters=parameters,
                          client_memory_bytes=(copies * parameters + activations) * BYTES_PER_VALUE,
                          fedavg_round_bytes=2 * parameters * BYTES_PER_VALUE)


def _crops_of(method_cls: type, args: argparse.Namespace, attribute: str) -> tuple[int, ...]:
    """Which crops a method sends through the clients' models or their momentum copies (read from an instance)."""
    server = nn.Module()
    server.features = lambda x: x  # type: ignore[method-assign]
    instance = method_cls.__new__(method_cls)
    try:
        method_cls.__init__(instance, args, build_split_model(args.arch, args.cutlayer, width=args.width,
                                                              head=method_cls.head_builder(args)).server,
                            torch.device("cpu"))
    except Exception:  # a method that cannot be built on the CPU: its class attributes say it
        return tuple(getattr(method_cls, attribute))
    return tuple(getattr(instance, attribute))


def describe(overhead: ClientOverhead) -> str:
    """One line: per step up/down/FLOPs, memory, FedAvg round."""
    mb = 1024 * 1024
    return (f"client cost per step (batch {overhead.batch_size}): smashed data up {overhead.smashed_up_bytes / mb:.3f} "
            f"MB, gradients down {overhead.gradient_down_bytes / mb:.3f} MB, {overhead.client_flops_per_step / 1e6:.1f} "
            f"MFLOPs; memory {overhead.client_memory_bytes / mb:.2f} MB ({overhead.client_parameters} parameters); "
            f"FedAvg round {overhead.fedavg_round_bytes / mb:.3f} MB")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Print the costs for the given run options, at every --cutlayer given; returns them."""
    from configs import parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    method, cutlayers = "moco", None
    if "--method" in argv:
        position = argv.index("--method")
        method = argv[position + 1]
        del argv[position:position + 2]
    if "--cutlayer" in argv:
        position = argv.index("--cutlayer")
        end = position + 1
        while end < len(argv) and not argv[end].startswith("--"):
            end += 1
        cutlayers = argv[position + 1:end]
        del argv[position:end]
    records = []
    for cutlayer in cutlayers or [None]:
        options = argv + (["--cutlayer", cutlayer] if cutlayer is not None else [])
        overhead = client_overhead(parse_args(method, [*options, "--output_dir", "unused"]))
        print(f"cut {overhead.cutlayer}: {describe(overhead)}")
        records.append(asdict(overhead))
    return records


if __name__ == "__main__":
    run_cli(main)
