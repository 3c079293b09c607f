"""Runs with real clients on 127.0.0.1: the server's Trainer and the run's log lines (devices: device_processes)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Self

import torch
from sfl_helpers import TINY_MOCO, TINY_SWAV

from configs import parse_args
from functions.core.distributed import Runtime
from functions.train.trainer import Trainer

# Four clients of 8 synthetic images each, 4 images a step: 2 steps an epoch, FedAvg after each epoch.
SMALL = ["--num_client", "4", "--batch_size", "4", "--data_proportion", "0.0625", "--min_client_samples", "4",
         "--client_exec", "loop"]
TINY = {"moco": TINY_MOCO, "swav": TINY_SWAV}
DEVICE_TIMEOUT_S = 120


def small_trainer(method: str, output_dir: Path, *extra: str) -> Trainer:
    """A Trainer of four tiny clients on CPU (extra options last)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    args = parse_args(method, [*TINY[method], *SMALL, "--output_dir", str(output_dir), *extra])
    return Trainer(args, Runtime(device=torch.device("cpu")), output_dir)


class RunLines(logging.Handler):
    """The run's log lines at INFO and above (the "sfl" logger stops propagating once a run set it up)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.logger = logging.getLogger("sfl")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> Self:
        self.previous_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.previous_level)
