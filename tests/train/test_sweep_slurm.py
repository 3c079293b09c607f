"""The sweep's Slurm launcher, driven end to end by stand-ins for sbatch, srun, sacct and scontrol that run the jobs
on this machine: one submission (a job array), a pre-empted run requeued and resumed exactly, a killed run
resubmitted with --resume, nothing submitted twice, and the launcher's options refused in one line."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fake_slurm
import pytest
from paths import REPO_ROOT

from functions.core.checkpoint import CHECKPOINT_NAME
from functions.core.errors import UserError
from functions.train.sweep import main
from functions.train.sweep_job import CHECKPOINT_FILE, SweepJobCall, launcher_command
from run_sflmoco import main as run_moco

# Tiny runs (4 steps an epoch, no kNN monitor, no linear probe): each process costs mostly its imports.
TINY = """dataset: synthetic
arch: ResNet18
width: 2
num_client: 2
batch_size: 8
data_proportion: 0.25
num_epoch: 3
eval_freq: 0
skip_linear: true
num_workers: 0
knn_k: 5
"""
TINY_MOCO = TINY + "K: 32\nK_dim: 8\n"
TINY_SWAV = TINY + "nmb_prototypes: 6\nfeat_dim: 8\nhidden_mlp: 16\n"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-in Slurm commands first on PATH; the jobs they start import the repository."""
    state = fake_slurm.install(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return state


def presets(folder: Path) -> list[str]:
    (folder / "tiny_moco.yaml").write_text(TINY_MOCO)
    (folder / "tiny_swav.yaml").write_text(TINY_SWAV)
    return [str(folder / "tiny_moco.yaml"), str(folder / "tiny_swav.yaml")]


def wait_for(path: Path, task: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        assert fake_slurm.job_state(task) not in fake_slurm.FINAL_STATES, f"job {task} ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def training_pid(run_folder: Path) -> int:
    """The run's own process (its folder lock names it)."""
    return int(re.match(r"pid (\d+)", (run_folder / ".lock").read_text())[1])


def commands(run_folder: Path) -> list[str]:
    """The command lines a run's console.log recorded, one per attempt."""
    return [line for line in (run_folder / "console.log").read_text().splitlines() if line.startswith("$ ")]


def test_a_slurm_sweep_resubmits_only_what_failed_and_resumes_preempted_runs_exactly(
        tmp_path: Path, cluster: Path, capsys: pytest.CaptureFixture) -> None:
    files = presets(tmp_path)
    output_dir = tmp_path / "sweep"
    sweep = ["--presets", *files, "--seeds", "0", "1", "--output_dir", str(output_dir), "--launcher", "slurm",
             "--slurm_partition", "debug", "--slurm_time", "0-00:30", "--slurm_array_parallelism", "2",
             "--slurm_extra", "account=lab"]
    assert main(sweep) == 0
    assert "sweep: 4 runs submitted" in capsys.readouterr().out
    moco0, moco1 = output_dir / "tiny_moco" / "seed0", output_dir / "tiny_moco" / "seed1"

    # Pre-emption warning (SIGUSR2, what submitit asks Slurm for) to the job once the run saved its first epoch:
    # the run saves and stops, the job is requeued and resumes from the checkpoint.
    wait_for(moco0 / CHECKPOINT_NAME, "1_0")
    os.kill(int((cluster / "jobs" / "1_0.pid").read_text()), signal.SIGUSR2)
    # A run killed outright (as by the kernel's OOM killer) after its first epoch: its job fails.
    wait_for(moco1 / CHECKPOINT_NAME, "1_1")
    os.kill(training_pid(moco1), signal.SIGKILL)
    states = fake_slurm.wait_until_ended(["1_0", "1_1", "1_2", "1_3"])
    assert states == {"1_0": "COMPLETED", "1_1": "FAILED", "1_2": "COMPLETED", "1_3": "COMPLETED"}
    assert "SIGUSR2 received" in (moco0 / "console.log").read_text()
    assert [command.endswith("--resume") for command in commands(moco0)] == [False, True]

    main(sweep[:8] + ["--status"])
    status = capsys.readouterr().out
    assert "tiny_moco seed 0: done (job 1_0)" in status and "tiny_swav seed 1: done (job 1_3)" in status
    assert re.search(r"tiny_moco seed 1: failed \(job 1_1, FAILED\): \S", status), status

    assert main(sweep) == 0  # only the failed run is resubmitted, resuming from its checkpoint
    out = capsys.readouterr().out
    assert "tiny_moco seed 1: submitted as job 2, resumes from its checkpoint (was failed" in out
    assert out.count("done before, kept") == 3
    assert main(sweep) == 0  # while it is queued or running: not submitted again
    assert re.search(r"tiny_moco seed 1: (queued|running) as job 2, not submitted again", capsys.readouterr().out)
    assert fake_slurm.wait_until_ended(["2"]) == {"2": "COMPLETED"}
    assert len(fake_slurm.submissions()) == 2
    assert [command.endswith("--resume") for command in commands(moco1)] == [False, True]

    # The submitted scripts ask for what the options say.
    first, second = (path.read_text() for path in fake_slurm.submissions())
    for line in ("#SBATCH --partition=debug", "#SBATCH --time=30", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --array=0-3%2", "#SBATCH --account=lab", "#SBATCH --signal=USR2@90"):
        assert line in first.splitlines(), line
    assert "--array" not in second and "#SBATCH --gpus-per-node" not in first

    # The table is the local launcher's: the same code reads the same folders, and the pre-empted run computed what
    # an uninterrupted run of its preset and seed computes, loss by loss (run here, in this process).
    assert main([*sweep, "--summarise_only"]) == 0
    table = (output_dir / "results.csv").read_text()
    assert main(sweep[:8] + ["--summarise_only"]) == 0
    assert (output_dir / "results.csv").read_text() == table
    rows = {row["preset"]: row for row in csv.DictReader(table.splitlines())}
    assert rows["tiny_moco"]["runs"] == rows["tiny_swav"]["runs"] == "2/2"
    local = tmp_path / "local"
    run_moco(["--config", str(moco0 / "sweep_config.yaml"), "--seed", "0", "--output_dir", str(local)])
    resumed, uninterrupted = (json.loads((folder / "metrics.json").read_text()) for folder in (moco0, local))
    assert resumed["train_loss"] == uninterrupted["train_loss"] and resumed["final"] == uninterrupted["final"]


def test_dry_run_prints_the_submission_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = presets(tmp_path)
    output_dir = tmp_path / "sweep"
    assert main(["--presets", files[0], "--seeds", "0", "1", "--output_dir", str(output_dir), "--launcher", "slurm",
                 "--dry_run", "--slurm_partition", "gpu", "--slurm_time", "2-00:00:00", "--gpus_per_run", "4",
                 "--nodes_per_run", "2", "--nproc_per_node", "4", "--slurm_extra", "qos=high", "exclusive="]) == 0
    out = capsys.readouterr().out
    assert "would submit 2 of 2 runs as one job array" in out and "tiny_moco seed 1 (not started)" in out
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=2880", "#SBATCH --gpus-per-node=4", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --qos=high", "#SBATCH --exclusive", "#SBATCH --array=0-1%2"):
        assert line in out.splitlines(), line
    assert not output_dir.exists()


def test_each_node_of_a_multi_node_run_starts_torchrun_with_slurms_rendezvous() -> None:
    environ = {"SLURM_JOB_ID": "1234", "SLURM_NODEID": "1"}
    assert launcher_command("py", 2, 4, environ, "node17") == [
        "py", "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=4", "--node_rank=1",
        "--master_addr=node17", "--master_port=21234"]
    assert launcher_command("py", 1, 4, environ) == ["py", "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node=4"]
    call = SweepJobCall(["run_sflmoco.py", "--seed", "0"], "/runs/seed0", "py")
    assert call.command({}, resume=True) == ["py", "run_sflmoco.py", "--seed", "0", "--resume"]
    assert CHECKPOINT_FILE == CHECKPOINT_NAME


@pytest.mark.parametrize(("options", "message"), [
    (["--slurm_partition", "gpu long"], r"^--slurm_partition 'gpu long': a partition name"),
    (["--slurm_time", "1h"], r"^--slurm_time '1h': write minutes, HH:MM:SS"),
    (["--slurm_time", "0"], r"^--slurm_time '0': the time limit must be positive"),
    (["--nodes_per_run", "2"], r"^--nodes_per_run 2 starts torchrun on every node: give --nproc_per_node"),
    (["--slurm_extra", "partition=gpu"], r"^--slurm_extra partition: the sweep sets --partition; use --slurm_part"),
    (["--slurm_extra", "account"], r"^--slurm_extra 'account': write an sbatch option as KEY=VALUE"),
    (["--gpus_per_run", "-1"], r"^--gpus_per_run must be at least 0"),
])
def test_slurm_option_mistakes_are_one_line(tmp_path: Path, options: list[str], message: str) -> None:
    files = presets(tmp_path)
    with pytest.raises(UserError, match=message):
        main(["--presets", files[0], "--output_dir", str(tmp_path / "o"), "--launcher", "slurm", "--dry_run",
              *options])


def test_a_launcher_that_is_not_there_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = presets(tmp_path)
    command = ["--presets", files[0], "--output_dir", str(tmp_path / "o")]
    with pytest.raises(UserError, match=r"^--slurm_partition is an option of --launcher slurm"):
        main([*command, "--slurm_partition", "gpu"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(UserError, match=r"^--launcher slurm: sbatch is not on PATH"):
        main([*command, "--launcher", "slurm"])
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"^--launcher slurm needs submitit: pip install submitit"):
        main([*command, "--launcher", "slurm"])
    assert main([*command, "--status"]) == 0  # the local launcher needs neither


# A stand-in run: says it started, saves on SIGTERM (as the training loop does) and exits 128 + 15.
STAND_IN_RUN = """
import pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[sys.argv.index("--output_dir") + 1])
def save(signum, frame):
    (folder / "checkpoint_last.pt").write_text("saved")
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, save)
(folder / "started").write_text(" ".join(sys.argv[1:]))
time.sleep(60)
"""


def test_a_job_stopped_by_sigterm_saves_and_requeues_itself(tmp_path: Path, cluster: Path) -> None:
    fake_slurm.set_state("7", "RUNNING")
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    call = SweepJobCall(["-c", STAND_IN_RUN, "--output_dir", str(run_folder)], str(run_folder))
    job = subprocess.Popen([sys.executable, "-c", f"from functions.train.sweep_job import SweepJobCall\n{call!r}()"],
                           env={**os.environ, "SLURM_JOB_ID": "7", "PYTHONPATH": str(REPO_ROOT)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (run_folder / "started").is_file():
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)  # pre-emption: Slurm signals the job
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 255 and "checkpoint saved, job 7 requeued" in out, out
    assert (run_folder / CHECKPOINT_FILE).read_text() == "saved"
    assert "scontrol requeue 7" in (cluster / "calls.log").read_text()
    assert "--resume" not in (run_folder / "started").read_text()
    assert call.command({}, resume=True)[-1] == "--resume"  # what the requeued job runs, the checkpoint being there
