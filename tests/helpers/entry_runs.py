"""Running the entry scripts as a user would (in a child process, or through run_cli in this one) and reading what
they leave: exit codes, error lines, checkpoint tensors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from paths import REPO_ROOT
from sfl_helpers import TINY_MOCO

from functions.core.errors import run_cli
from functions.data.datasets import NO_DOWNLOAD_ENV

# The Python client loop starts faster than the vectorised one, which matters for the short subprocess runs.
FAST = [*TINY_MOCO, "--client_exec", "loop", "--num_client", "3", "--batch_size", "8"]
SUBPROCESS_TIMEOUT_S = 180


def entry_env(**extra: str) -> dict[str, str]:
    """Environment of an entry-script subprocess: never downloads, CPU threads kept low."""
    env = {**os.environ, NO_DOWNLOAD_ENV: "1", "OMP_NUM_THREADS": "1", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def run_entry(script: str, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run an entry script as the user would and capture its output."""
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *argv], cwd=REPO_ROOT, env=entry_env(**env),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


def assert_clean_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, no traceback, and one `error:` line on stderr naming every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], (fragment, error_lines[0])


def cli_error(main, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run an entry's main() through run_cli (as the script does); return its exit code and its error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return exit_info.value.code, lines[0]


def checkpoint_tensors(state: dict) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds for the model side (server, queue, clients, optimizers), by a flat name."""
    flat: dict[str, torch.Tensor] = {}

    def walk(node, name: str) -> None:
        if isinstance(node, torch.Tensor):
            flat[name] = node
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{name}.{key}")
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                walk(value, f"{name}[{index}]")

    for key in ("method", "parts", "clients", "server_optimizer"):
        walk(state[key], key)
    return flat


def server_weights(trainer) -> dict[str, torch.Tensor]:
    """A copy of the server's trainable weights."""
    return {name: p.detach().clone() for name, p in trainer.method.server.named_parameters()}


SLOW_DRIVER = """
import sys, time
sys.path.insert(0, {repo!r})
import run_sflmoco
from functions.train import trainer as simulator
from functions.core.errors import run_cli

progress = sys.argv[1]
original_step = simulator.Trainer.train_step

def slow_step(self, batch):
    result = original_step(self, batch)
    with open(progress, "a") as stream:
        stream.write(str(self.global_step + 1) + "\\n")
    time.sleep(0.25)
    return result

simulator.Trainer.train_step = slow_step
sys.argv = ["run_sflmoco.py", *sys.argv[2:]]
run_cli(lambda: run_sflmoco.main(sys.argv[1:]))
"""
