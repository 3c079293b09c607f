"""Running an entry script as one process or under torchrun with several CPU processes (gloo), and comparing what
the runs leave: logged losses and checkpoint tensors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from forked_commands import TORCHRUN_FORKED, run_forked
from paths import REPO_ROOT

import run_sflmoco
import run_sflswav
from functions.core.checkpoint import CHECKPOINT_NAME, load_checkpoint


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_env(**extra: str) -> dict[str, str]:
    """The environment of a torchrun started by a test: one torch thread, none of an outer torchrun's variables,
    and `extra`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def launch(script: str, argv: list[str], processes: int, forked: bool = False) -> subprocess.CompletedProcess:
    """Run an entry script as one plain process or under torchrun with `processes` CPU processes; `forked`: torchrun
    itself forked from the tests' fork server and its workers forked from it (tests/helpers/forked_commands.py), the
    project imported once instead of in every process."""
    if processes == 1:
        return subprocess.run([sys.executable, script, *argv], cwd=REPO_ROOT, env=torchrun_env(),
                              capture_output=True, text=True, timeout=240)
    ranks = ["--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    if forked:
        return run_forked([TORCHRUN_FORKED, *ranks, script, *argv], torchrun_env())
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *ranks, script, *argv], cwd=REPO_ROOT,
                          env=torchrun_env(), capture_output=True, text=True, timeout=240)


def train_in_process(script: str, base: list[str], output_dir: Path, *extra: str) -> Path:
    """The one-process reference run, inside this test process (one torch thread, as a child would have)."""
    assert torch.get_num_threads() == 1
    main = {"run_sflmoco.py": run_sflmoco.main, "run_sflswav.py": run_sflswav.main}[script]
    main([*base, "--device", "cpu", "--output_dir", str(output_dir), *extra])
    return output_dir


def train(script: str, base: list[str], output_dir: Path, processes: int, *extra: str) -> Path:
    """Train under torchrun (workers forked from a process that imported the project) or, for one process, here."""
    if processes == 1:
        return train_in_process(script, base, output_dir, *extra)
    result = launch(script, [*base, "--device", "cpu", "--output_dir", str(output_dir), *extra], processes,
                    forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def losses(output_dir: Path) -> list[list[float]]:
    return json.loads((output_dir / "metrics.json").read_text())["train_loss"]


def model_side(state: dict, key: str):
    """A checkpoint's entry `key`; the method's extra state is one of its parts."""
    return state["parts"][key] if key == "method_extra" else state[key]


def tensors(tree, path: str = ""):
    """(path, tensor) of every tensor in nested dicts and lists."""
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from tensors(value, f"{path}.{key}")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from tensors(value, f"{path}[{index}]")


REDUCTION_ORDER_DRIFT = 0.1


def assert_same_run(expected_dir: Path, actual_dir: Path, loss_tolerance: float, weight_tolerance: float,
                     exact_steps: int | None = None) -> None:
    """Same logged losses and same checkpoint tensors (weights, momentum copies, optimizers, queues); with
    `exact_steps`, only the first that many losses exactly, the rest of the run within the reduction-order envelope."""
    expected_losses, actual_losses = losses(expected_dir), losses(actual_dir)
    assert [step for step, _ in actual_losses] == [step for step, _ in expected_losses]
    for index, ((step, expected), (_, actual)) in enumerate(zip(expected_losses, actual_losses)):
        tolerance = loss_tolerance if exact_steps is None or index < exact_steps else REDUCTION_ORDER_DRIFT
        assert actual == pytest.approx(expected, abs=tolerance), f"loss of step {step}"
    expected, actual = load_checkpoint(expected_dir / CHECKPOINT_NAME), load_checkpoint(actual_dir / CHECKPOINT_NAME)
    assert actual["global_step"] == expected["global_step"]
    for key in ("method", "method_extra", "clients", "server_optimizer"):
        expected_tensors, actual_tensors = dict(tensors(model_side(expected, key), key)), dict(
            tensors(model_side(actual, key), key))
        assert actual_tensors.keys() == expected_tensors.keys(), key
        for name, value in expected_tensors.items():
            if not value.is_floating_point():
                assert torch.equal(actual_tensors[name], value), name
            elif exact_steps is None:
                assert torch.allclose(actual_tensors[name], value, rtol=weight_tolerance, atol=weight_tolerance), name
            else:  # past the exact steps only the shape and finiteness: thread order alone moves them by their size
                assert actual_tensors[name].shape == value.shape and bool(torch.isfinite(actual_tensors[name]).all()), name
