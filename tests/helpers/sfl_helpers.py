"""Small builders shared by the training-loop tests: tiny synthetic runs that finish in seconds on CPU."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import run_sflmoco
from configs import parse_args
from functions.core.distributed import Runtime
from functions.sfl.clients.loop import ClientSide
from functions.train.trainer import Trainer

TINY_MOCO = ["--dataset", "synthetic", "--arch", "ResNet18", "--width", "8", "--num_workers", "0",
             "--K", "64", "--K_dim", "16", "--num_epoch", "2", "--skip_linear", "--eval_freq", "0",
             "--log_freq", "1", "--seed", "3"]


def moco_trainer(output_dir: Path, *extra: str) -> Trainer:
    """A Trainer for SFL-MoCo on synthetic data with a narrow ResNet-18, on CPU."""
    args = parse_args("moco", [*TINY_MOCO, "--output_dir", str(output_dir), *extra])
    output_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(args, Runtime(device=torch.device("cpu")), output_dir)


TINY_SWAV = ["--dataset", "synthetic", "--arch", "ResNet18", "--width", "8", "--num_workers", "0",
             "--nmb_prototypes", "12", "--feat_dim", "16", "--hidden_mlp", "32", "--num_epoch", "2",
             "--skip_linear", "--eval_freq", "0", "--log_freq", "1", "--seed", "5"]


def swav_trainer(output_dir: Path, *extra: str) -> Trainer:
    """A Trainer for SFL-SwAV on synthetic data with a narrow ResNet-18, on CPU."""
    args = parse_args("swav", [*TINY_SWAV, "--output_dir", str(output_dir), *extra])
    output_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(args, Runtime(device=torch.device("cpu")), output_dir)


def run_moco_with_bottleneck(tmp_path: Path, name: str, *extra: str) -> Path:
    """A tiny SFL-MoCo run of two clients with MocoSFL's C4S2 bottleneck at the cut, in tmp_path/name."""
    output_dir = tmp_path / name
    run_sflmoco.main([*TINY_MOCO, "--num_client", "2", "--batch_size", "8", "--output_dir", str(output_dir),
                      "--bottleneck_option", "C4S2", *extra])
    return output_dir


def overflow_at(trainer, step: int) -> None:
    """Make the loss of global step `step` (1-based) infinite, as an fp16 overflow or a diverging run would."""
    original = trainer.method.compute_loss
    calls = {"count": trainer.global_step}

    def compute_loss(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        calls["count"] += 1
        return (loss * float("inf") if calls["count"] == step else loss), stats

    trainer.method.compute_loss = compute_loss


def client_weights(trainer) -> dict[str, torch.Tensor]:
    """A copy of every client's weights, stacked by name."""
    return {k: v.clone() for k, v in trainer.clients.stacked_state(range(trainer.args.num_client)).items()}


def weights_changed(before: dict, after: dict) -> bool:
    """Whether any floating-point tensor differs between two copies of the weights."""
    return any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def three_different_clients() -> ClientSide:
    """Three clients of one Linear(4, 3) layer, each with its own random weights."""
    torch.manual_seed(0)
    clients = ClientSide(nn.Linear(4, 3), 3, lr=0.1, momentum=0.0, weight_decay=0.0, keep_momentum_copies=False,
                         device=torch.device("cpu"))
    for model in clients.models:  # each client its own weights, so a misrouted row changes the gradients
        nn.init.normal_(model.weight)
    return clients
