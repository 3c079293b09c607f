"""The one place that decides devices, ranks and world size (torchrun's environment or a single process).

Under torchrun (WORLD_SIZE > 1) every process joins one process group (NCCL on CUDA, gloo on CPU) and simulates
its share of the clients: the epoch's pool, ascending, is cut into `world_size` contiguous blocks, rank r taking
block r, so the ranks' rows stacked in rank order are the single-process batch. The helpers below are the
collectives the training loop needs: sums, row gathers, client-state hand-over, and a global BatchNorm.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from functions.core.errors import UserError

Result = TypeVar("Result")


@dataclass(frozen=True)
class Runtime:
    """Where this process computes and which part of the run it owns."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """The training device: --device if given, else CUDA (this rank's GPU) when present, else CPU."""
    if requested is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested} asked for CUDA, but no CUDA device is available (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _environment_int(name: str, default: str) -> int:
    """An integer from torchrun's environment; a clear error when it is not one."""
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise UserError(f"the environment variable {name}={value!r} is not an integer; launch with torchrun "
                        "or unset it") from None


def planned_world_size() -> int:
    """Number of processes torchrun started for this run (1 without torchrun)."""
    return _environment_int("WORLD_SIZE", "1")


def launcher_prefix() -> str:
    """How this run was launched, to repeat in a printed command: python, or torchrun with its process counts."""
    world_size = planned_world_size()
    if world_size <= 1:
        return "python"
    per_node = _environment_int("LOCAL_WORLD_SIZE", str(world_size))
    if per_node >= world_size:
        return f"torchrun --nproc_per_node {per_node}"
    # Several nodes: the rendezvous options are the user's own and not visible here.
    return f"torchrun --nnodes {world_size // per_node} --nproc_per_node {per_node} <your rendezvous options>"


def setup_runtime(requested_device: str | None) -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); join the process group when WORLD_SIZE > 1."""
    world_size = _environment_int("WORLD_SIZE", "1")
    rank = _environment_int("RANK", "0")
    local_rank = _environment_int("LOCAL_RANK", "0")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world_size} do not describe a process of the run; "
                        "launch with torchrun")
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        # Streams, events and libraries that default to "the current device" then use the run's GPU (--device cuda:1).
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown_runtime(runtime: Runtime) -> None:
    """Leave the process group (after the last collective of the run)."""
    if runtime.is_distributed and dist.is_initialized():
        # Free the run's objects in reference cycles (the DDP server and its reducer) while Python is fully alive:
        # left to interpreter shutdown, gloo's teardown aborted the process now and then.
        gc.collect()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ client sharding
def client_shares(pool: Sequence[int], world_size: int) -> list[list[int]]:
    """The pool (ascending) cut into `world_size` contiguous, nearly equal blocks: block r is rank r's clients."""
    ordered = sorted(int(c) for c in pool)
    return [block.tolist() for block in np.array_split(np.asarray(ordered, dtype=np.int64), world_size)]


def check_clients_per_rank(pool_size: int, num_client: int, client_sample_ratio: float, world_size: int) -> None:
    """Refuse a run whose pool has fewer clients than there are processes (a rank would have nothing to train)."""
    if pool_size < world_size:
        raise UserError(f"--num_client {num_client} with --client_sample_ratio {client_sample_ratio} trains "
                        f"{pool_size} client(s) per epoch, fewer than the {world_size} processes; use more clients "
                        "or fewer processes (--nproc_per_node / --nnodes)")


# --------------------------------------------------------------------------------------------- collectives
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all ranks (in place, returned); the identity without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max_flag(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `tensor` concatenated in rank order (ranks may hold different row counts); no graph."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor.detach()
    world_size = dist.get_world_size()
    local_rows = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    all_rows = [torch.zeros_like(local_rows) for _ in range(world_size)]
    dist.all_gather(all_rows, local_rows)
    rows = [int(r.item()) for r in all_rows]
    # all_gather needs equal shapes: pad to the largest block, then drop the padding.
    padded = tensor.detach().new_zeros((max(rows), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    blocks = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(blocks, padded.contiguous())
    return torch.cat([block[:count] for block, count in zip(blocks, rows)])


def run_agreed(action: Callable[[], Result]) -> Result:
    """Run a rank-local step (start-up, a file rank 0 writes); a UserError on any rank stops every rank with it.

    Without it a rank that cannot read its data or write its folder or checkpoint exits alone, and the others
    fail later in a collective with a transport error instead of the one clear line. Every rank must call it.
    """
    problem: str | None = None
    result: Result | None = None
    try:
        result = action()
    except UserError as error:
        problem = str(error)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # One small tensor collective when all went well; the message travels only when a rank failed.
        world_size = dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        first_failed = torch.tensor([dist.get_rank() if problem is not None else world_size], device=device)
        dist.all_reduce(first_failed, op=dist.ReduceOp.MIN)
        rank = int(first_failed.item())
        if rank < world_size:
            raise UserError(f"rank {rank}: {broadcast_object(problem, rank, device or torch.device('cpu'))}",
                            on_every_rank=True)
    elif problem is not None:
        raise UserError(problem)
    return result  # type: ignore[return-value]


def broadcast_object(value: Any, source: int, device: torch.device) -> Any:
    """`value` of rank `source`, on every rank (pickled; for rare, small transfers such as client states)."""
    holder = [value]
    dist.broadcast_object_list(holder, src=source, device=device if device.type == "cuda" else None)
    return holder[0]


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is again an all_reduce(SUM): d(sum_r f_r)/dx_r for every rank's input."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.clone()
        dist.all_reduce(reduced)
        return reduced

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        reduced = grad_output.contiguous().clone()
        dist.all_reduce(reduced)
        return reduced


def differentiable_sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks with gradients flowing back to every rank's contribution."""
    return _SumOverRanks.apply(tensor)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of all ranks' rows together (torch's SyncBatchNorm is
    CUDA-only); same parameters, buffers and state-dict keys as nn.BatchNorm1d."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        if input.dim() != 2:
            raise ValueError(f"GlobalBatchNorm1d expects (N, C) input, got {tuple(input.shape)}")
        values = input.float()
        count = differentiable_sum_over_ranks(values.new_tensor([float(values.shape[0])]))
        mean = differentiable_sum_over_ranks(values.sum(dim=0)) / count
        centred = values - mean
        # Two passes (mean, then centred squares) as a single-process BatchNorm computes its variance.
        variance = differentiable_sum_over_ranks((centred * centred).sum(dim=0)) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                total = float(count.item())
                unbiased = variance.detach() * (total / max(total - 1.0, 1.0))
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        normalised = centred * torch.rsqrt(variance + self.eps)
        if self.affine:
            normalised = normalised * self.weight + self.bias
        return normalised.to(input.dtype)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm1d inside `module` by a GlobalBatchNorm1d holding the same weights and buffers."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm1d) and not isinstance(child, GlobalBatchNorm1d):
            replacement = GlobalBatchNorm1d(child.num_features, eps=child.eps, momentum=child.momentum,
                                            affine=child.affine, track_running_stats=child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            tensors = [*child.parameters(), *child.buffers()]
            setattr(module, name, replacement.to(tensors[0].device) if tensors else replacement)
        else:
            convert_to_global_batchnorm(child)
    return module


# ------------------------------------------------------------------------------------- the server under DDP
def data_parallel(module: nn.Module, runtime: Runtime) -> DistributedDataParallel:
    """`module` as one process of a multi-process run: its BatchNorm1d layers made global, then DDP around it (the
    gradients of a forward pass through the wrapper are averaged over processes)."""
    convert_to_global_batchnorm(module)
    return DistributedDataParallel(module, device_ids=[runtime.device.index] if runtime.is_cuda else None,
                                   find_unused_parameters=False)


# ------------------------------------------------------------------------------------------ client hand-over
def to_cpu(tree: Any) -> Any:
    """The same nested dicts/lists with every tensor copied to the CPU (to send it to other ranks)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {key: to_cpu(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [to_cpu(value) for value in tree] if isinstance(tree, list) else tuple(to_cpu(v) for v in tree)
    return tree


class ClientHandOver:
    """Under torchrun, which rank holds the current state of each client; moves states when the pool's shares move.

    Every rank keeps every client, but only the rank that trained a client last has its current weights, momentum
    copy and optimizer state; before another rank trains it (or before a checkpoint), that rank sends it.
    """

    def __init__(self, num_client: int, runtime: Runtime) -> None:
        self.runtime = runtime
        # Rank holding the current state of each client when only one does; -1: every rank does.
        self.holder = np.full(num_client, -1, dtype=np.int64)

    def share(self, clients: Any, client_ids: Sequence[int]) -> None:
        """Give every rank the current state of these clients (from the rank that trained them last)."""
        by_source: dict[int, list[int]] = {}
        for client in client_ids:
            if self.holder[client] >= 0:
                by_source.setdefault(int(self.holder[client]), []).append(int(client))
        if not by_source:
            return
        device = self.runtime.device
        full: dict | None = None
        for source in sorted(by_source):  # the same order on every rank: holders are known everywhere
            ids = by_source[source]
            payload = None
            if self.runtime.rank == source:
                states = clients.state_dict()
                payload = {key: [to_cpu(states[key][c]) for c in ids] if states[key] else []
                           for key in ("models", "momentum_models", "optimizers")}
            payload = broadcast_object(payload, source, device)
            if self.runtime.rank != source:
                full = full if full is not None else clients.state_dict()
                for key, values in payload.items():
                    for client, value in zip(ids, values):
                        full[key][client] = value
            self.holder[ids] = -1
        if full is not None:
            clients.load_state_dict(full)

    def hand_over(self, clients: Any, pool: Sequence[int]) -> None:
        """Before an epoch: clients that change rank get their state from the last one; mark the new holders."""
        shares = client_shares(pool, self.runtime.world_size)
        owner = {client: rank for rank, share in enumerate(shares) for client in share}
        moving = [c for c in pool if self.holder[c] not in (-1, owner[c])]
        self.share(clients, moving)
        for client, rank in owner.items():
            self.holder[client] = rank

    def all_current(self) -> None:
        """Every rank holds every client's state (after loading a checkpoint)."""
        self.holder.fill(-1)
