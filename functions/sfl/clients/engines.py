"""--client_exec: which client engine simulates the clients (functions.sfl.clients.loop' loop or functions.sfl.clients.vmap's
vectorised pass), and the rule by which `auto` (the default) chooses.

Both engines give the same results up to the order of floating-point sums, so the choice is about speed only. The
rule is the benchmarks' (benchmarks/bench_sfl.py and benchmarks/peer_mocosfl.py, engines timed in turns; figures in
docs/speed.md): on a GPU the vectorised pass (one kernel per layer for the whole pool, instead of one
per client); on a CPU too, except for client parts 64 channels wide with 8 or more images per client, where one
dense convolution per client is about as fast as the grouped one (ResNet-18 at width 64, 10 clients x 8 images: the
loop 2-9 % ahead timed in one process, the vectorised pass 3-5 % ahead in separate processes); at width 32 and 8
images the two are level (0.97-1.07x), at width 8 to 16 or 1 image per client the vectorised pass is 1.0-2.6x faster.
Client parts with buffers (BatchNorm) cannot be vectorised and always run in the loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from functions.sfl.clients.loop import ClientSide
from functions.sfl.clients.vmap import VectorisedClientSide

ClientEngine = ClientSide | VectorisedClientSide

# On a CPU the loop is chosen from this many output channels in the client's widest convolution ...
CPU_LOOP_MIN_CHANNELS = 64
# ... when each client also sends at least this many images per step.
CPU_LOOP_MIN_ROWS = 8


def widest_convolution(module: nn.Module) -> int:
    """The largest number of output channels of a convolution in `module` (0 without one)."""
    return max((layer.out_channels for layer in module.modules() if isinstance(layer, nn.modules.conv._ConvNd)),
               default=0)


def auto_client_exec(template: nn.Module, device: torch.device, rows_per_client: int) -> str:
    """The engine `--client_exec auto` runs: "loop" or "vmap" (see the module's docstring for the rule)."""
    if any(True for _ in template.buffers()):
        return "loop"
    if device.type == "cpu" and widest_convolution(template) >= CPU_LOOP_MIN_CHANNELS \
            and rows_per_client >= CPU_LOOP_MIN_ROWS:
        return "loop"
    return "vmap"


@dataclass(frozen=True)
class ClientEngineOptions:
    """The run options the client engines read."""

    num_client: int
    batch_size: int      # rows per client per step, for --client_exec auto's choice
    client_exec: str     # auto, vmap or loop
    c_lr: float
    momentum: float
    weight_decay: float


def build_client_engine(template: nn.Module, options: ClientEngineOptions, device: torch.device, *,
                        keep_momentum_copies: bool, engine: str = "auto",
                        memory_format: torch.memory_format = torch.contiguous_format) -> ClientEngine:
    """--num_client copies of `template` in the engine of --client_exec (auto: auto_client_exec's choice), each
    with its SGD at --c_lr; `engine` chooses inside the vectorised engine."""
    choice = (auto_client_exec(template, device, options.batch_size) if options.client_exec == "auto"
              else options.client_exec)
    settings = dict(lr=options.c_lr, momentum=options.momentum, weight_decay=options.weight_decay,
                    keep_momentum_copies=keep_momentum_copies, device=device, memory_format=memory_format)
    if choice == "loop":
        return ClientSide(template, options.num_client, **settings)
    return VectorisedClientSide(template, options.num_client, engine=engine, **settings)
