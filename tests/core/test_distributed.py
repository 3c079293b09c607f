"""torchrun with two processes (gloo, CPU) against one process: same losses, weights, resume, clear refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from forked_commands import TORCHRUN_FORKED, ForkedCommand
from paths import REPO_ROOT
from sfl_helpers import TINY_MOCO, TINY_SWAV
from torchrun_runs import REDUCTION_ORDER_DRIFT, assert_same_run, free_port, torchrun_env, train

from functions.core.checkpoint import CHECKPOINT_NAME, load_checkpoint
from functions.core.distributed import client_shares
from functions.data.datasets import NO_DOWNLOAD_ENV

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


# With MocoSFL's initialisation these tiny runs are chaotic in float32: a ReLU input within rounding of zero takes the
# other side when the order of a sum changes, and that row's gradient changes by percents. One process with 1 and
# with 2 threads (nothing else changed; MOCO_SAMPLED, loop engine) gives the same losses for 2 steps, then 2.9e-4
# apart at step 3 and 2.8e-2 by step 11, and optimizer momentum buffers up to 4x their size apart. So the runs are
# compared exactly where no update has compounded yet (the first two logged steps: one full step, its gradients back
# to the clients and the next forward), and afterwards only within that envelope: the same steps, losses within
# REDUCTION_ORDER_DRIFT, the same integer state (step, queue pointers, pools), float tensors of the same shapes and
# finite. A row sent to a wrong rank or client shows at the first two steps; weights and queues after 8-14 steps
# (GroupNorm biases, queue rows) move by their own size with the thread count alone, so they are not compared there.


def test_client_shares_cut_the_pool_into_contiguous_blocks_in_rank_order():
    assert client_shares([7, 1, 4, 9, 3], 2) == [[1, 3, 4], [7, 9]]
    assert client_shares([0, 1, 2, 3], 4) == [[0], [1], [2], [3]]
    assert sum(client_shares(list(range(10)), 3), []) == list(range(10))


# MoCo with client sampling: pools change between epochs, so clients move between ranks (their optimizer state
# and momentum copy travel with them), FedAvg runs mid-epoch and at the epoch's end, the queue wraps around.
MOCO_SAMPLED = [*TINY_MOCO, "--num_client", "4", "--batch_size", "24", "--client_sample_ratio", "0.5",
                "--avg_freq", "2", "--max_steps", "14", "--log_freq", "3", "--no-symmetric", "--no-cos"]


def test_two_processes_train_moco_like_one_process(tmp_path):
    # The reference runs the loop engine: the vectorised engine packing two clients in one process rounds its
    # convolutions otherwise (1e-7), and on MocoSFL's views that moves the loss by 1e-4 at step 6 at once (a jump,
    # as when a ReLU input within rounding of zero changes side); the engines are compared in float64 in
    # tests/sfl/clients/test_vmap.py. The two processes keep the default engine, one client each.
    one = train("run_sflmoco.py", MOCO_SAMPLED, tmp_path / "one", 1, "--client_exec", "loop")
    two = train("run_sflmoco.py", MOCO_SAMPLED, tmp_path / "two", 2)
    # Only the order of floating-point sums differs (DDP's gradient all-reduce, FedAvg's partial sums): the first
    # two losses agree exactly, the rest of the run stays in the envelope above (measured: losses within 4.4e-2).
    assert_same_run(one, two, loss_tolerance=1e-5, weight_tolerance=1e-4, exact_steps=2)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["world_size"] == 2


def test_two_processes_train_mocosfl_symmetric_with_client_queues_like_one_process(tmp_path):
    # MocoSFL's symmetric term (the momentum copies' rows through the DDP server) and one queue per client, whose
    # keys are gathered from both ranks. The loop engine runs the same kernels in one and two processes. --K 256:
    # each client's queue (64 keys, wrapping every few steps) outlives a step's 24 keys; with --K 64 each step
    # replaced a whole queue of 16 by its last online keys, and the run amplified rounding (1e-7) to 1e-4 by step 8.
    options = [*MOCO_SAMPLED, "--symmetric", "--disable_feature_sharing", "--max_steps", "8", "--client_exec", "loop",
               "--K", "256"]
    one = train("run_sflmoco.py", options, tmp_path / "one", 1)
    two = train("run_sflmoco.py", options, tmp_path / "two", 2)
    assert_same_run(one, two, loss_tolerance=1e-4, weight_tolerance=1e-4, exact_steps=2)
    assert len(load_checkpoint(two / CHECKPOINT_NAME)["parts"]["method_extra"]["client_queues"]) == 4


def test_two_processes_run_divergence_aware_fedavg_like_one_process(tmp_path):
    # Each rank mixes its own clients; the lambdas of every client reach every rank. Loop engine: see above.
    options = [*MOCO_SAMPLED, "--max_steps", "8", "--divergence_aware", "--divergence_measure", "--client_exec",
               "loop"]
    one = train("run_sflmoco.py", options, tmp_path / "one", 1)
    two = train("run_sflmoco.py", options, tmp_path / "two", 2)
    assert_same_run(one, two, loss_tolerance=1e-4, weight_tolerance=1e-4, exact_steps=2)
    metrics_one, metrics_two = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    divergences = [value for _, value in metrics_two["client_divergence"]]
    # Logged at each epoch's end, past the exact steps: within the envelope (measured 4 % apart).
    assert divergences == pytest.approx([value for _, value in metrics_one["client_divergence"]],
                                        rel=REDUCTION_ORDER_DRIFT)


def test_two_processes_save_communication_like_one_process(tmp_path):
    # 13 epochs: after the 10 warm-up epochs, epoch 12 uploads only and epoch 13 replays each rank's kept rows.
    # With a tiny learning rate the rounding of two processes cannot grow over the 39 steps, so every loss, the
    # replayed ones included, must be the one-process loss (loop engine: see above).
    options = [*TINY_MOCO, "--num_client", "4", "--batch_size", "8", "--data_proportion", "0.17", "--no-cos",
               "--num_epoch", "13", "--log_freq", "2", "--loss_threshold", "100", "--lr", "1e-6", "--c_lr", "1e-6",
               "--client_exec", "loop"]
    one = train("run_sflmoco.py", options, tmp_path / "one", 1)
    two = train("run_sflmoco.py", options, tmp_path / "two", 2)
    assert_same_run(one, two, loss_tolerance=1e-4, weight_tolerance=1e-4, exact_steps=2)
    metrics_one, metrics_two = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    assert [status for _, status in metrics_two["communication_status"]][-3:] == [0, 1, 2]
    for key in ("communication_status", "communication_bytes_saved", "communication_epochs_saved"):
        assert metrics_two[key] == metrics_one[key], key
    assert sorted(path.name for path in (two / "replay_tensors").iterdir()) == [
        f"rank{rank}_step{step}.pt" for rank in (0, 1) for step in range(metrics_two["steps_per_epoch"])]


def test_two_processes_train_fl_moco_like_one_process(tmp_path):
    options = [*TINY_MOCO, "--scheme", "fl", "--local_epoch", "2", "--num_client", "4", "--batch_size", "16",
               "--client_sample_ratio", "0.5", "--max_steps", "6", "--client_exec", "loop", "--log_freq", "2"]
    one = train("run_sflmoco.py", options, tmp_path / "one", 1)
    two = train("run_sflmoco.py", options, tmp_path / "two", 2)
    assert_same_run(one, two, loss_tolerance=1e-4, weight_tolerance=1e-4)


# SwAV with a BatchNorm projection head, the queue in use from the start and hetero clients (unequal rows per rank).
SWAV_QUEUE = [*TINY_SWAV, "--num_client", "4", "--batch_size", "8", "--queue_length", "32",
              "--epoch_queue_starts", "0", "--max_steps", "4", "--hetero", "--hetero_string", "0.25_0.5|8|0.75_0.5"]


def test_two_processes_train_swav_like_one_process(tmp_path):
    one = train("run_sflswav.py", SWAV_QUEUE, tmp_path / "one", 1)
    two = train("run_sflswav.py", SWAV_QUEUE, tmp_path / "two", 2)
    # Sinkhorn's exp(score / epsilon) with epsilon 0.05 amplifies reduction-order differences in the scores.
    assert_same_run(one, two, loss_tolerance=5e-3, weight_tolerance=5e-3, exact_steps=2)


def test_resume_under_torchrun_continues_the_run(tmp_path):
    base = [*TINY_MOCO, "--num_client", "4", "--batch_size", "24", "--client_sample_ratio", "0.5", "--log_freq", "2"]
    straight = train("run_sflmoco.py", [*base, "--max_steps", "10"], tmp_path / "straight", 2)
    train("run_sflmoco.py", [*base, "--max_steps", "5"], tmp_path / "split", 2)
    assert load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)["global_step"] == 5
    split = train("run_sflmoco.py", [*base, "--max_steps", "10", "--resume"], tmp_path / "split", 2)
    assert_same_run(straight, split, loss_tolerance=1e-5, weight_tolerance=1e-5)


def test_fewer_clients_than_processes_is_one_clear_error(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    result = subprocess.run([sys.executable, "run_sflmoco.py", *TINY_MOCO, "--num_client", "1", "--output_dir",
                             str(tmp_path / "run")], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "fewer than the 2 processes" in lines[0]


@pytest.mark.parametrize("environment, expected", [
    ({}, "python run_sflmoco.py --lr 0.1 --resume"),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "torchrun --nproc_per_node 2 run_sflmoco.py --lr 0.1 --resume"),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"},
     "torchrun --nnodes 2 --nproc_per_node 4 <your rendezvous options> run_sflmoco.py --lr 0.1 --resume"),
])
def test_the_printed_resume_command_repeats_the_launcher(monkeypatch, environment, expected):
    from configs import parse_args
    from functions.train.stopping import ResumeCommandOptions, resume_command

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["run_sflmoco.py", "--lr", "0.1", "--resume"])
    assert resume_command(ResumeCommandOptions.from_args(parse_args("moco", ["--lr", "0.1"]))) == expected


def test_only_the_announcing_rank_prints_an_interruption(capsys):
    from functions.core.errors import TrainingInterrupted, run_cli

    def stopped(announce: bool):
        def main():
            raise TrainingInterrupted("SIGTERM received: stopped after step 3", 15, announce=announce)
        return main

    for announce, printed in ((True, "interrupted: SIGTERM received: stopped after step 3\n"), (False, "")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(stopped(announce))
        assert exit_info.value.code == 143 and capsys.readouterr().err == printed


def _start_two_ranks(launcher: list[str], script_and_argv: list[str]) -> ForkedCommand:
    """torchrun (`launcher`: its module or tests/helpers/torchrun_forked.py) with two ranks on this machine, forked
    from the tests' fork server (tests/helpers/forked_commands.py), never downloading."""
    return ForkedCommand([*launcher, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                          str(free_port()), *script_and_argv], torchrun_env(**{NO_DOWNLOAD_ENV: "1"}))


def test_sigterm_to_torchrun_saves_once_and_prints_the_torchrun_resume_command(tmp_path):
    # A launcher that signals twice (`timeout` forwarding to torchrun and a scheduler's own SIGTERM) makes torchrun
    # send SIGTERM twice to every worker. Every rank must still finish its step and stop together, rank 0 saving
    # the checkpoint and printing how to resume.
    from entry_runs import SLOW_DRIVER

    driver, progress, run_dir = tmp_path / "driver.py", tmp_path / "progress.txt", tmp_path / "run"
    driver.write_text(SLOW_DRIVER.format(repo=str(REPO_ROOT)))
    argv = [*TINY_MOCO, "--num_client", "4", "--batch_size", "8", "--num_epoch", "50", "--log_freq", "1",
            "--device", "cpu", "--output_dir", str(run_dir)]
    child = _start_two_ranks(["-m", "torch.distributed.run"], [str(driver), str(progress), *argv])
    try:
        deadline = time.monotonic() + 120
        while not (progress.is_file() and len(progress.read_text().split()) >= 4):  # both ranks, two steps each
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        time.sleep(0.01)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    announced = [line for line in stderr.splitlines() if line.startswith("interrupted: SIGTERM received")]
    assert len(announced) == 1, stderr[-3000:]
    assert "resume with: torchrun --nproc_per_node 2 run_sflmoco.py" in announced[0]
    assert "before a checkpoint could be saved" not in stderr and "[rank" not in stderr, stderr[-3000:]
    saved = load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert saved["global_step"] >= 2


SLOW_MONITOR = """
import sys, time
sys.path.insert(0, {repo!r})
import run_sflmoco
from functions.evaluation import context
from functions.core.errors import run_cli

marker, real_extract = sys.argv[1], context.extract_features


def slowly(batches):
    for batch in batches:
        open(marker, "a").close()
        time.sleep(0.5)  # a monitor over a large memory set
        yield batch


context.extract_features = lambda encode, loader, *args, **kwargs: real_extract(encode, slowly(loader), *args,
                                                                                  **kwargs)
run_cli(lambda: run_sflmoco.main(sys.argv[2:]))
"""
MONITOR_STOPS_WITHIN_S = 10


def test_sigterm_to_torchrun_during_the_knn_monitor_stops_every_rank_within_seconds(tmp_path):
    # The monitor before training reads 40 batches at 0.5 s each; the ranks agree on a stop every 4 batches.
    script, marker, run_dir = tmp_path / "slow_monitor.py", tmp_path / "monitoring", tmp_path / "run"
    script.write_text(SLOW_MONITOR.format(repo=str(REPO_ROOT)))
    argv = [*TINY_MOCO, "--num_client", "2", "--batch_size", "8", "--eval_freq", "1", "--eval_batch_size", "16",
            "--device", "cpu", "--output_dir", str(run_dir)]
    child = _start_two_ranks([TORCHRUN_FORKED], [str(script), str(marker), *argv])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = child.communicate(timeout=MONITOR_STOPS_WITHIN_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {MONITOR_STOPS_WITHIN_S} s after SIGTERM") from None
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    announced = [line for line in stderr.splitlines() if line.startswith("interrupted: SIGTERM received")]
    assert len(announced) == 1 and "stopped after step 0" in announced[0], stderr[-3000:]
    assert "the kNN monitor of epoch 0 was cut short" in stdout
    # The one traceback is torchrun's own report of the signal: no rank failed.
    assert stderr.count("Traceback") == stderr.count("SignalException: Process") <= 1, stderr[-3000:]
    assert "[rank" not in stderr, stderr[-3000:]
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["global_step"] == 0


def _launch_two_nodes(script: str, argv: list[str], output_dirs: tuple[Path, Path],
                      node_options: tuple[list[str], list[str]] = ([], [])) -> list[subprocess.CompletedProcess]:
    """torchrun as two one-process "nodes" on this machine, each node with its own --output_dir (its own disk),
    forked from the tests' fork server, each node's worker forked from its torchrun (torchrun_forked.py)."""
    port = str(free_port())
    nodes = [ForkedCommand([TORCHRUN_FORKED, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                            "--master_addr", "127.0.0.1", "--master_port", port, script, *argv, *node_options[node],
                            "--output_dir", str(output_dirs[node])], torchrun_env(**{NO_DOWNLOAD_ENV: "1"}))
             for node in (0, 1)]
    results = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    return results


def test_resume_across_nodes_without_a_shared_disk_takes_rank_zeros_checkpoint(tmp_path):
    base = [*TINY_MOCO, "--num_client", "4", "--batch_size", "8", "--device", "cpu"]
    straight = train("run_sflmoco.py", [*base, "--max_steps", "5"], tmp_path / "straight", 1)
    node0, node1 = tmp_path / "node0", tmp_path / "node1"  # node 1 never sees node 0's files
    train("run_sflmoco.py", [*base, "--max_steps", "3"], node0, 1)
    results = _launch_two_nodes("run_sflmoco.py", [*base, "--max_steps", "5", "--resume"], (node0, node1))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:] + results[1].stderr[-2000:]
    assert not (node1 / CHECKPOINT_NAME).exists()
    assert_same_run(straight, node0, loss_tolerance=1e-4, weight_tolerance=1e-4, exact_steps=2)

    # A refusal decided on rank 0 (no checkpoint to resume) is one line on every rank, not a crash of the others.
    results = _launch_two_nodes("run_sflmoco.py", [*base, "--max_steps", "5", "--resume"], (node1, node0))
    for result in results:
        assert result.returncode != 0
        worker_errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert worker_errors == [f"error: --resume: no {CHECKPOINT_NAME} in {node1}; run without --resume to start"]
        assert "[rank" not in result.stderr, result.stderr[-2000:]


def test_a_single_process_on_a_second_gpu_makes_it_the_current_device(monkeypatch):
    # Without set_device, CUDA events, streams and DALI would default to GPU 0 while the run works on GPU 1.
    from functions.core import distributed

    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    runtime = distributed.setup_runtime("cuda:1")
    assert runtime.device == torch.device("cuda", 1) and selected == [torch.device("cuda", 1)]
    assert not runtime.is_distributed


def test_a_node_without_the_data_stops_every_rank_with_its_one_line(tmp_path):
    # Node 0 has CIFAR-10, node 1 an empty --data_dir (and no download): every rank says why, none crashes.
    base = [*TINY_MOCO, "--num_client", "4", "--batch_size", "8", "--device", "cpu", "--max_steps", "2",
            "--dataset", "cifar10"]
    sample = str(REPO_ROOT / "sample_data" / "cifar10")
    empty = tmp_path / "no_data"
    empty.mkdir()
    results = _launch_two_nodes("run_sflmoco.py", base, (tmp_path / "node0", tmp_path / "node1"),
                                (["--data_dir", sample], ["--data_dir", str(empty)]))
    for result in results:
        assert result.returncode != 0
        worker_errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(worker_errors) == 1 and worker_errors[0].startswith("error: rank 1: "), result.stderr[-2000:]
        assert str(empty) in worker_errors[0]
        assert "[rank" not in result.stderr, result.stderr[-2000:]


DISK_FULL_ON_RANK_ZERO = """
import errno, os, sys
sys.path.insert(0, {repo!r})
import run_sflmoco
from functions.train import trainer as trainer_state
from functions.core.errors import run_cli
from functions.core.files import write_atomic

real_save_atomic, saves = trainer_state.save_atomic, []


def full_disk(stream):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def save_atomic(state, path):  # rank 0's disk fills after its first checkpoint
    saves.append(state["global_step"])
    if len(saves) > 1 and os.environ["RANK"] == "0":
        return write_atomic(path, full_disk)
    return real_save_atomic(state, path)


trainer_state.save_atomic = save_atomic
run_cli(lambda: run_sflmoco.main(sys.argv[1:]))
"""


def test_a_full_disk_on_rank_zero_during_training_stops_every_rank_with_its_one_line(tmp_path):
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL_ON_RANK_ZERO.format(repo=str(REPO_ROOT)))
    node0, node1 = tmp_path / "node0", tmp_path / "node1"  # one stderr per rank: two one-process "nodes"
    results = _launch_two_nodes(str(script), [*TINY_MOCO, "--num_client", "4", "--batch_size", "8", "--device", "cpu"],
                                (node0, node1))
    expected = (f"error: rank 0: cannot write {node0 / CHECKPOINT_NAME} (No space left on device); "
                f"the previous {CHECKPOINT_NAME}, if any, is unchanged")
    for result in results:  # both ranks stop with rank 0's line, neither with a traceback
        assert result.returncode != 0
        worker_errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert worker_errors == [expected], result.stderr[-3000:]
        assert "[rank" not in result.stderr, result.stderr[-3000:]
    assert load_checkpoint(node0 / CHECKPOINT_NAME)["epoch"] == 1  # the first epoch's checkpoint is intact
