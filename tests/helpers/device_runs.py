"""Runs with real clients on 127.0.0.1: certificates, device processes, the run's log lines."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Self

import torch
from paths import REPO_ROOT
from sfl_helpers import TINY_MOCO, TINY_SWAV

from configs import parse_args
from functions.core.distributed import Runtime
from functions.data.datasets import NO_DOWNLOAD_ENV
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


def start_device(port: int, client: int, certs: Path, retry_s: float = 30.0) -> subprocess.Popen:
    """`python -m functions.device` for `client`, as a user starts it (one torch thread, never downloading)."""
    env = {**os.environ, NO_DOWNLOAD_ENV: "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "functions.device", "--server", f"127.0.0.1:{port}",
                             "--client_id", str(client), "--credentials", str(certs), "--retry_s", str(retry_s)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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
