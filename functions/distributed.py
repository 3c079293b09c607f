"""The one place that decides devices, ranks and world size (torchrun's environment or a single process)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from functions.errors import UserError


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


def setup_runtime(requested_device: str | None) -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) when present; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1:
        raise UserError("runs under torchrun with more than one process are not supported yet; run one process")
    return Runtime(device=resolve_device(requested_device, local_rank), rank=rank,
                   world_size=world_size, local_rank=local_rank)
