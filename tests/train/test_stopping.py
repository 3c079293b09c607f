"""Stopping a run: SIGTERM and SIGINT mid-epoch and outside training, what is saved, and resuming exactly."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from entry_runs import FAST, SLOW_DRIVER, SUBPROCESS_TIMEOUT_S, checkpoint_tensors, entry_env
from forked_commands import ForkedCommand, run_forked
from paths import REPO_ROOT
from sfl_helpers import moco_trainer

import run_sflmoco
from functions.core.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    stale_temporaries,
)
from functions.core.distributed import all_reduce_sum
from functions.core.errors import TrainingInterrupted
from functions.train.stopping import AgreedStopBatches, StopSignal, WorkCutShort

# Runs the real entry script in a child process (forked from the tests' fork server); each step also writes its
# number to a progress file and pauses, so the test can send SIGTERM from outside while the run is mid-epoch.


def start_slow_run(tmp_path: Path, argv: list[str], new_session: bool = False) -> tuple[ForkedCommand, Path]:
    """Start the slowed entry script (forked: tests/helpers/forked_commands.py); return the process once it has
    finished two steps."""
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_DRIVER.format(repo=str(REPO_ROOT)))
    progress = tmp_path / "progress.txt"
    child = ForkedCommand([str(driver), str(progress), *argv], entry_env(), new_session=new_session)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not (progress.is_file() and len(progress.read_text().split()) >= 2):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"the run made no progress: {child.communicate()}")
        time.sleep(0.05)
    return child, progress


def test_sigterm_mid_epoch_saves_and_the_printed_resume_reaches_the_uninterrupted_weights(tmp_path):
    interrupted_dir = tmp_path / "interrupted"
    child, _ = start_slow_run(tmp_path, [*FAST, "--output_dir", str(interrupted_dir)])
    try:
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    resume_lines = [line for line in stderr.splitlines() if "resume with: " in line]
    assert len(resume_lines) == 1 and resume_lines[0].startswith("interrupted: SIGTERM received"), stderr
    assert "resume with" in (interrupted_dir / "output.log").read_text()

    saved = load_checkpoint(interrupted_dir / CHECKPOINT_NAME)
    stopped_at = saved["global_step"]
    steps_per_epoch = json.loads((interrupted_dir / "metrics.json").read_text())["steps_per_epoch"]
    assert 2 <= stopped_at < steps_per_epoch - 2 and saved["epoch"] == 0, "not stopped mid-epoch"
    assert saved["step_in_epoch"] == stopped_at
    assert stale_temporaries(interrupted_dir / CHECKPOINT_NAME) == []

    # Resume with exactly the printed command (in this process), a few steps further.
    command = shlex.split(resume_lines[0].split("resume with: ", 1)[1])
    assert Path(command[1]).name == "run_sflmoco.py" and command[-1] == "--resume"
    final_step = stopped_at + 2
    run_sflmoco.main([*command[2:], "--max_steps", str(final_step)])
    straight_dir = tmp_path / "straight"
    run_sflmoco.main([*FAST, "--output_dir", str(straight_dir), "--max_steps", str(final_step)])

    resumed, straight = load_checkpoint(interrupted_dir / CHECKPOINT_NAME), load_checkpoint(straight_dir / CHECKPOINT_NAME)
    assert resumed["global_step"] == straight["global_step"] == final_step
    expected, actual = checkpoint_tensors(straight), checkpoint_tensors(resumed)
    assert expected.keys() == actual.keys() and len(expected) > 10
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    losses = lambda folder: json.loads((folder / "metrics.json").read_text())["train_loss"]  # noqa: E731
    assert losses(interrupted_dir) == losses(straight_dir)


def test_sigterm_to_the_whole_process_group_with_data_workers_stops_cleanly(tmp_path):
    # Slurm and Ctrl-C signal every process of the group: the data-loader workers die too, the step must not.
    run_dir = tmp_path / "run"
    child, _ = start_slow_run(tmp_path, [*FAST, "--num_workers", "2", "--output_dir", str(run_dir)],
                              new_session=True)
    try:
        os.killpg(child.pid, signal.SIGTERM)
        _, stderr = child.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and "resume with: " in stderr
    saved = load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert saved["global_step"] >= 2 and saved["step_in_epoch"] == saved["global_step"]


def test_stop_signal_requests_once_ignores_repeated_sigterm_and_stops_at_a_second_sigint():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs in the main thread between bytecodes
        assert stop.requested and stop.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun repeats SIGTERM while stopping its workers
        time.sleep(0.01)
        assert stop.requested and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is before


def test_slurms_warning_signal_sigusr2_is_a_stop_request_like_sigterm():
    before = signal.getsignal(signal.SIGUSR2)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)
        assert stop.requested and stop.name == "SIGUSR2"
        os.kill(os.getpid(), signal.SIGTERM)  # Slurm may follow with SIGTERM: still the same request
        time.sleep(0.01)
        assert stop.name == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR2) is before


def test_a_stop_before_the_first_step_saves_a_resumable_step_zero(tmp_path):
    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    trainer.stop.request(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="SIGINT received: stopped after step 0") as interrupted:
        trainer.train()
    assert interrupted.value.exit_code == 130
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["global_step"] == 0


SIGNAL_AT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import run_sflmoco
from functions.train import federated_data as data
from functions.train import trainer as simulator
from functions.core.errors import run_cli

where, number = sys.argv[1], getattr(signal, sys.argv[2])
if where == "start":
    real_init = data.FederatedData.__init__

    def init_then_signal(self, *args, **kwargs):
        os.kill(os.getpid(), number)
        real_init(self, *args, **kwargs)

    data.FederatedData.__init__ = init_then_signal
else:
    real_evaluation = simulator.Trainer.final_evaluation

    def evaluation_then_signal(self):
        os.kill(os.getpid(), number)
        return real_evaluation(self)

    simulator.Trainer.final_evaluation = evaluation_then_signal
run_cli(lambda: run_sflmoco.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where", ["start", "evaluation"])
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_outside_training_says_what_was_saved(tmp_path, where, name):
    script = tmp_path / "signal_at.py"
    script.write_text(SIGNAL_AT.format(repo=str(REPO_ROOT)))
    run_dir = tmp_path / "run"
    result = run_forked([str(script), where, name, *FAST, "--max_steps", "2", "--output_dir", str(run_dir)],
                        entry_env(), timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 128 + getattr(signal, name), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    if where == "start":
        assert lines[0] == f"interrupted: {name} received before training started; nothing new was saved (run the same command again)"
        assert not (run_dir / CHECKPOINT_NAME).exists()
    else:
        checkpoint = run_dir / CHECKPOINT_NAME
        assert lines[0].startswith(f"interrupted: {name} received during the final evaluation; training is "
                                   f"complete and saved in {checkpoint} (step 2)")
        assert f"run_sflmoco.py --eval_only --checkpoint {checkpoint}" in lines[0]
        assert load_checkpoint(checkpoint)["global_step"] == 2


SLOW_SCHEDULE = """
import sys, time
sys.path.insert(0, {repo!r})
import run_sflmoco
from functions.data import loaders
from functions.core.errors import run_cli

marker = sys.argv[1]
real_plan = loaders.FederatedSchedule.step_plan

def slow_plan(self, *args, **kwargs):
    open(marker, "a").close()
    time.sleep(0.2)  # each step's plan is slow: an epoch's whole schedule would take hours to build
    return real_plan(self, *args, **kwargs)

loaders.FederatedSchedule.step_plan = slow_plan
run_cli(lambda: run_sflmoco.main(sys.argv[2:]))
"""
STOP_WITHIN_S = 15


def test_sigterm_while_the_schedule_is_read_stops_within_seconds(tmp_path):
    script = tmp_path / "slow_schedule.py"
    script.write_text(SLOW_SCHEDULE.format(repo=str(REPO_ROOT)))
    marker = tmp_path / "planning"
    run_dir = tmp_path / "run"
    # --local_epoch 1000: 21,000 steps an epoch, whose plans the loader must not build before the first step.
    child = ForkedCommand([str(script), str(marker), *FAST, "--scheme", "fl", "--local_epoch", "1000",
                           "--output_dir", str(run_dir)], entry_env())
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not marker.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"the run never read its schedule: {child.communicate()}")
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    try:
        _, stderr = child.communicate(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise AssertionError(f"still running {STOP_WITHIN_S} s after SIGTERM") from None
    assert child.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted: SIGTERM received: stopped after step" in stderr
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["global_step"] <= 2


def test_sigterm_during_the_knn_monitor_cuts_it_short_and_saves(tmp_path, monkeypatch):
    from functions.train import trainer as simulator

    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8",
                           "--eval_freq", "1")

    def slow_monitor(context):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)  # a monitor over a large memory set
        return {"knn_acc": 0.0}

    monkeypatch.setattr(simulator, "knn_evaluation", slow_monitor)
    started = time.monotonic()
    with trainer.stop, pytest.raises(TrainingInterrupted, match="SIGTERM received: stopped after step 0"):
        trainer.train()
    assert time.monotonic() - started < 10
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["global_step"] == 0
    assert trainer.method.server.training  # the monitor's eval mode did not outlive it


def read_until_cut(batches: AgreedStopBatches) -> tuple[list[int], str]:
    """The batches read from `batches` and how the reading ended: the WorkCutShort message, or "finished"."""
    read: list[int] = []
    try:
        for batch in batches:
            read.append(batch)
    except WorkCutShort as cut:
        return read, str(cut)
    return read, "finished"


def test_without_a_process_group_a_signal_cuts_the_batches_at_the_next_agreement():
    stop = StopSignal(announce=False)

    def batches():
        for index in range(10):
            if index == 5:
                stop.request(signal.SIGTERM)
            yield index

    assert read_until_cut(AgreedStopBatches(batches(), stop, torch.device("cpu"), every=4)) == ([*range(8)], "SIGTERM")
    assert read_until_cut(AgreedStopBatches(range(10), StopSignal(), torch.device("cpu"), every=4)) == (
        [*range(10)], "finished")


def _agreeing_rank(rank: int, store_file: str, out_dir: str) -> None:
    """One rank of the agreement test: three monitors of ten batches, agreeing every four; records what it read."""
    dist.init_process_group("gloo", store=dist.FileStore(store_file, 2), rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))  # collectives out of step fail instead of hanging
    try:
        outcomes = []
        for signalled, failing in ((1, False), (0, True), (None, False)):
            stop = StopSignal(announce=False)

            def batches():
                for index in range(10):
                    if rank == signalled and index == 2 + 3 * signalled:
                        stop.request(signal.SIGTERM)
                        if failing:  # the signal also ended this rank's data workers
                            raise RuntimeError("DataLoader worker exited unexpectedly")
                    yield index

            outcomes.append(read_until_cut(AgreedStopBatches(batches(), stop, torch.device("cpu"), every=4)))
            # Every rank made the same collectives: the next one pairs with its own kind on the other rank.
            outcomes[-1] += (float(all_reduce_sum(torch.tensor([rank + 1.0])).item()),)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="gloo is not available")
def test_two_ranks_leave_the_monitor_at_the_same_batch_whichever_got_the_signal(tmp_path):
    mp.start_processes(_agreeing_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    elsewhere = "a stop signal (on another rank)"
    # Rank 1 signalled before its sixth batch: both ranks read eight, then leave at the second agreement.
    assert ranks[0][0] == [[*range(8)], elsewhere, 3.0] and ranks[1][0] == [[*range(8)], "SIGTERM", 3.0]
    # Rank 0 signalled before its third batch, which its loader never gave: rank 1 reads on to the first agreement.
    assert ranks[0][1] == [[0, 1], "SIGTERM", 3.0] and ranks[1][1] == [[*range(4)], elsewhere, 3.0]
    # No signal: both read everything.
    assert ranks[0][2] == ranks[1][2] == [[*range(10)], "finished", 3.0]
