"""Small builders shared by the training-loop tests: tiny synthetic runs that finish in seconds on CPU."""
from __future__ import annotations

from pathlib import Path

import torch

from configs import parse_args
from functions.core.distributed import Runtime
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
