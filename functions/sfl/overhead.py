"""What one client sends, receives, computes and holds (MocoSFL's overhead_calculator.py, for this collection's models).

Every run logs these figures at its start and keeps them in metrics.json ("overhead"); alone:

    python -m functions.sfl.overhead --cutlayer 2 --batch_size 1          # any option of run_sflmoco.py
    python -m functions.sfl.overhead --method swav --cutlayer 1 2 3       # several cut layers side by side

Per client and step (one batch of --batch_size images): the smashed data sent up (the rows of every crop the client
model runs, including its momentum copy's for MoCo), the gradient rows received (crops that send gradients), the
client's FLOPs (forward, backward and momentum forward, counted by torch's FlopCounterMode), and its memory
(weights, momentum copy, SGD momentum, and the activations of one step). Per FedAvg round, the client's weights go
up and the average comes back. With --scheme fl there is no smashed data and the whole network is the client's.

Client FLOPs come in two conventions. This project's (`client_flops_per_step`): every FLOP of the step as torch
counts it, a multiply and an add being two, the backward measured (about twice the forward), GroupNorm not
counted. MocoSFL's (`mocosfl_flops_per_image`, what its overhead_calculator.py prints as "FLOPs/image", in units
of 2^20): three times the forward count of fvcore's FlopCountAnalysis on one image of the first crop's size, in
which a multiply-add is one FLOP and a GroupNorm 5 per element. For ResNet-18 at 32 px, cuts 1, 2, 3: 6.00,
223.88, 441.75 M (2^20) in MocoSFL's convention; 10.6, 614.6, 1218.6 M (10^6) per step of one image in ours.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from configs import parse_args
from functions.core.distributed import Runtime
from functions.core.errors import run_cli
from functions.core.precision import MixedPrecision
from functions.data.datasets import resolved_entry
from functions.data.views import ViewSpec
from functions.methods.registry import method_class
from functions.sfl.fl_step import build_fl_step
from functions.sfl.step import build_split_step

BYTES_PER_VALUE = 4  # float32 on the wire and in memory (halve for fp16 smashed data)
MEASURED_ROWS = 2
MOCOSFL_FLOP_UNIT = 2**20  # MocoSFL's "M" of FLOPs
MOCOSFL_PASSES = 3  # MocoSFL counts a step as three forwards (forward, backward, momentum forward)
_ATEN = torch.ops.aten


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
    mocosfl_flops_per_image: int = 0  # MocoSFL's convention (see the module docstring); divide by 2**20 for its M


class _FvcoreExtras(TorchDispatchMode):
    """What fvcore (MocoSFL's counter) adds to the multiply-adds: 5 per element of an affine GroupNorm, LayerNorm
    or training BatchNorm (4 without affine), 2 (1) per element of an evaluating BatchNorm, 1 per input element of
    an average pool to 1x1 (which reaches the dispatcher as a mean over the last two dimensions)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        packet = func.overloadpacket
        if packet is _ATEN.native_group_norm:
            self.count += args[0].numel() * (5 if args[1] is not None else 4)
        elif packet is _ATEN.native_layer_norm:
            self.count += args[0].numel() * (5 if args[2] is not None else 4)
        elif packet in (_ATEN.native_batch_norm, _ATEN._native_batch_norm_legit):
            training = args[5]
            self.count += args[0].numel() * ((5 if training else 2) - (0 if args[1] is not None else 1))
        elif packet is _ATEN._native_batch_norm_legit_no_training:
            self.count += args[0].numel() * (2 if args[1] is not None else 1)
        elif (packet is _ATEN.mean and len(args) > 1 and args[0].dim() == 4
              and sorted(int(d) % 4 for d in args[1]) == [2, 3]):
            self.count += args[0].numel()
        return func(*args, **(kwargs or {}))


def mocosfl_convention_flops(model: nn.Module, image: torch.Tensor) -> int:
    """MocoSFL's client FLOPs per image: 3x the forward count of fvcore (a multiply-add is one FLOP, norms 4-5 per
    element) of `model` on the rows of `image`, per row."""
    extras = _FvcoreExtras()
    with torch.no_grad(), FlopCounterMode(display=False) as counter, extras:
        model(image)
    # FlopCounterMode counts the multiply and the add of every multiply-add: halved, fvcore's count.
    forward = counter.get_total_flops() // 2 + extras.count
    return MOCOSFL_PASSES * forward // image.shape[0]


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


def client_overhead(step: Any, views: ViewSpec, batch_size: int, cutlayer: int) -> ClientOverhead:
    """The costs of one client of a built step (SplitStep or FL's step): measured on two images per crop on the
    CPU (BatchNorm in a head needs two), then scaled to --batch_size (work and activations grow with the rows)."""
    method, clients = step.method, step.clients
    federated = not getattr(step, "sends_smashed_data", True)
    model = clients.module_with({name: rows[0] for name, rows in clients.stacked_state([0]).items()}).cpu()
    model.train()
    up = down = flops = activations = 0
    for index, (size, _) in enumerate(views.crops()):
        online, momentum = index in method.trainable_crops, index in method.momentum_crops
        if not (online or momentum):
            continue
        # A trainable crop outside the method's gradient_crops trains the server only: no gradient comes back.
        sends_gradient = online and (method.gradient_crops is None or index in method.gradient_crops)
        image = torch.rand(MEASURED_ROWS, 3, size, size, generator=torch.Generator().manual_seed(index))
        with FlopCounterMode(display=False) as counter:
            output = model(image)
        forward = counter.get_total_flops()
        if online:
            backward = 0
            if sends_gradient:
                with FlopCounterMode(display=False) as counter:
                    output.float().sum().backward()
                backward = counter.get_total_flops()
                down += output.numel()
            flops += forward + backward
            activations += _activation_values(model, image)
        if momentum:
            flops += forward
        up += output.numel() * (int(online) + int(momentum))
    if federated:
        up = down = 0  # FL sends weights only, at FedAvg
    first_size = views.crops()[0][0]
    mocosfl_flops = mocosfl_convention_flops(model, torch.rand(MEASURED_ROWS, 3, first_size, first_size,
                                                               generator=torch.Generator().manual_seed(0)))
    parameters = sum(p.numel() for p in model.parameters())
    copies = 3 if method.momentum_crops else 2  # weights and SGD momentum, plus the momentum copy when kept
    def per_step(measured: int) -> int:
        return measured * batch_size // MEASURED_ROWS

    return ClientOverhead(cutlayer=0 if federated else cutlayer, batch_size=batch_size,
                          smashed_up_bytes=per_step(up) * BYTES_PER_VALUE,
                          gradient_down_bytes=per_step(down) * BYTES_PER_VALUE,
                          client_flops_per_step=per_step(int(flops)), client_parameters=parameters,
                          client_memory_bytes=(copies * parameters + per_step(activations)) * BYTES_PER_VALUE,
                          fedavg_round_bytes=2 * parameters * BYTES_PER_VALUE,
                          mocosfl_flops_per_image=mocosfl_flops)


def overhead_of_options(args: argparse.Namespace) -> ClientOverhead:
    """The costs of one client under these run options (one client built on the CPU, nothing trained)."""
    torch.manual_seed(args.seed)

    one_client = argparse.Namespace(**{**vars(args), "num_client": 1, "compile": False, "client_exec": "loop"})
    runtime = Runtime(device=torch.device("cpu"))
    build = build_fl_step if args.scheme == "fl" else build_split_step
    step = build(one_client, runtime, MixedPrecision(None, runtime))
    views = method_class(args.method).view_spec(args, resolved_entry(args.dataset, args.data_size))
    return client_overhead(step, views, args.batch_size, args.cutlayer)


def describe(overhead: ClientOverhead) -> str:
    """One line: per step up/down/FLOPs (this project's count, then MocoSFL's convention), memory, FedAvg round."""
    mb = 1024 * 1024
    return (f"client cost per step (batch {overhead.batch_size}): smashed data up {overhead.smashed_up_bytes / mb:.3f} "
            f"MB, gradients down {overhead.gradient_down_bytes / mb:.3f} MB, {overhead.client_flops_per_step / 1e6:.1f} "
            f"MFLOPs (multiply and add counted apart, backward measured; MocoSFL-convention FLOPs/image "
            f"{overhead.mocosfl_flops_per_image / MOCOSFL_FLOP_UNIT:.2f} M = 3x forward multiply-adds with GroupNorm, "
            f"M = 2^20); memory {overhead.client_memory_bytes / mb:.2f} MB ({overhead.client_parameters} parameters); "
            f"FedAvg round {overhead.fedavg_round_bytes / mb:.3f} MB")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Print the costs for the given run options, at every --cutlayer given; returns them."""
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
        overhead = overhead_of_options(parse_args(method, [*options, "--output_dir", "unused"]))
        print(f"cut {overhead.cutlayer}: {describe(overhead)}")
        records.append(asdict(overhead))
    return records


if __name__ == "__main__":
    run_cli(main)
