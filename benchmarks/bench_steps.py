"""The train step of one benchmark setting (benchmarks/bench_sfl.py), built from the same initial weights and data
in every mode: the unsplit network (centralised), the training loop's SplitStep over either client engine (loop,
vmap), or that step's client half alone (--client_only)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from configs import parse_args
from functions.core.distributed import Runtime
from functions.core.precision import MixedPrecision
from functions.data.datasets import dataset_entry
from functions.data.layout import StepLayout
from functions.data.loaders import StepBatch
from functions.data.views import ViewSpec
from functions.methods.base import ServerMethod, StepContext
from functions.methods.registry import method_class
from functions.sfl.clients.vmap import VectorisedClientSide
from functions.sfl.step import SplitStep, build_split_step
from models.split import build_unsplit_model

Step = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Setting:
    """One measured configuration."""

    method: str
    mode: str
    device: str
    clients: int
    sampled_clients: int
    per_client_batch: int
    cutlayer: int | None   # None for the centralised step, which has no cut
    amp: bool
    arch: str
    width: int
    engine: str | None     # the vectorised client side's engine (vmap mode only)
    client_only: bool = False
    channels_last: bool = False   # convolutions in NHWC, as --channels_last of the training scripts
    compile: bool = False         # torch.compile of the server part, as --compile of the training scripts
    method_config: str | None = None  # YAML preset of the method options (None: the entry script's defaults)



def method_args(method: str, seed: int, method_config: str | None = None) -> argparse.Namespace:
    """The method's options: the defaults of run_sflmoco.py / run_sflswav.py, or those of a YAML preset."""
    preset = ["--config", method_config] if method_config else []
    return parse_args(method, [*preset, "--seed", str(seed), "--output_dir", "unused"])


def synthetic_crops(views: ViewSpec, rows: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    """Random image crops of the global batch, one tensor per crop of the method's views."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 3, size, size, generator=generator).to(device) for size, _ in views.crops()]


def view_spec_of(method: str, args: argparse.Namespace) -> ViewSpec:
    """The views the method's loader makes of the options' dataset (CIFAR-10 by default)."""
    return method_class(method).view_spec(args, dataset_entry(args.dataset))


def precision_for(device: torch.device, amp: bool) -> MixedPrecision:
    """The step's precision: fp16 autocast with a loss scaler on CUDA, bf16 autocast on CPU, or full precision."""
    if not amp:
        return MixedPrecision(None, Runtime(device=device))
    return MixedPrecision(torch.float16 if device.type == "cuda" else torch.bfloat16, Runtime(device=device))


def centralised_step(method: ServerMethod, optimizer: torch.optim.Optimizer, precision: MixedPrecision,
                     crops: Sequence[torch.Tensor]) -> Step:
    """One step of the unsplit network: the method's loss on the raw crops, one backward, one optimizer step."""
    state = {"step": 0}
    scaler = precision.scaler

    context = StepContext(0, StepLayout.of([0], [crops[0].shape[0]]))

    def step() -> torch.Tensor:
        method.start_server_step()
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            momentum_inputs = [crops[k] for k in method.momentum_crops]
            loss, _ = method.compute_loss([crops[k] for k in method.trainable_crops], momentum_inputs, context)
        scaler.scale(loss).backward()
        method.before_server_step(state["step"])
        scaler.step(optimizer)
        scaler.update()
        method.after_server_step()
        state["step"] += 1
        return loss.detach()

    return step


def sfl_step(split_step: SplitStep, crops: Sequence[torch.Tensor], pool: list[int], rows: list[int]) -> Step:
    """The training loop's own step (functions.sfl.step.SplitStep) on fixed crops, for either client engine."""
    batch = StepBatch(crops=list(crops), client_ids=pool, rows_per_client=rows,
                      sample_indices=torch.zeros(sum(rows), dtype=torch.long))
    state = {"step": 0}

    def step() -> torch.Tensor:
        loss, _ = split_step(batch, epoch=0, global_step=state["step"])
        state["step"] += 1
        return loss

    return step


def client_only_step(split_step: SplitStep, crops: Sequence[torch.Tensor], pool: list[int], rows: list[int]) -> Step:
    """The client half of an SFL step alone: a fixed server gradient stands in for the server."""
    clients, method, precision = split_step.clients, split_step.method, split_step.precision
    scaler = precision.scaler
    gradients: list[torch.Tensor] = []

    def step() -> torch.Tensor:
        if method.client_momentum > 0:
            clients.update_momentum_copies(pool, method.client_momentum)
        clients.zero_grad(pool)
        with precision.autocast():
            smashed = clients.forward([crops[k] for k in method.trainable_crops], pool, rows)
            if method.momentum_crops:
                clients.momentum_forward([crops[k] for k in method.momentum_crops], pool, rows)
        if not gradients:
            generator = torch.Generator().manual_seed(0)
            gradients.extend(torch.randn(s.shape, generator=generator).to(s.device, s.dtype) for s in smashed)
        clients.backward(gradients)
        clients.step(pool, scaler)
        scaler.update()
        return torch.stack([s.detach().float().square().mean() for s in smashed]).sum()

    return step


def build_step(setting: Setting, device: torch.device, seed: int) -> tuple[Step, str | None]:
    """The train step of one setting, built from the same initial weights and data in every mode."""
    args = method_args(setting.method, seed, setting.method_config)
    args.arch, args.width, args.num_client = setting.arch, setting.width, setting.clients
    args.channels_last, args.compile = setting.channels_last, setting.compile
    rows = [setting.per_client_batch] * setting.sampled_clients
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    crops = [crop.contiguous(memory_format=memory_format)
             for crop in synthetic_crops(view_spec_of(setting.method, args), sum(rows), device, seed)]
    precision = precision_for(device, setting.amp)
    torch.manual_seed(seed)
    if setting.mode == "centralised":
        method_cls = method_class(setting.method)
        network = build_unsplit_model(args.arch, head=method_cls.head_builder(args), use_ws=not args.disable_WS,
                                      width=args.width, image_size=args.data_size)
        method = method_cls(args, network.to(device, memory_format=memory_format), device)
        if setting.compile:
            method.server.compile()
        optimizer = torch.optim.SGD(method.optimized_parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        return centralised_step(method, optimizer, precision, crops), None
    args.cutlayer = setting.cutlayer
    args.client_exec = "loop" if setting.mode == "loop" else "vmap"
    split_step = build_split_step(args, Runtime(device=device), precision, engine=setting.engine or "auto")
    generator = torch.Generator().manual_seed(seed + 1)
    pool = sorted(torch.randperm(setting.clients, generator=generator)[: setting.sampled_clients].tolist())
    clients = split_step.clients
    engine = clients.engine if isinstance(clients, VectorisedClientSide) else None
    if setting.client_only:
        return client_only_step(split_step, crops, pool, rows), engine
    return sfl_step(split_step, crops, pool, rows), engine
