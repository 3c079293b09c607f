"""Robustness: interrupted runs resume exactly, checkpoints are never half-written, numerical faults stop cleanly
(or are skipped under fp16 loss scaling), and every bad input is one line with exit code 2."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sfl_helpers import TINY_MOCO, TINY_SWAV, moco_trainer

import run_sflmoco
import run_sflswav
from functions.core import checkpoint as checkpoint_module
from functions.core import files as files_module
from functions.core.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    remove_stale_temporaries,
    save_atomic,
    stale_temporaries,
)
from functions.core.errors import TrainingInterrupted, UserError, exit_with_error, run_cli
from functions.core.files import write_text_atomic
from functions.data import cifar
from functions.data.datasets import NO_DOWNLOAD_ENV
from functions.data.loaders import FederatedSchedule
from functions.train.stopping import StopSignal

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CIFAR10 = REPO_ROOT / "sample_data" / "cifar10"
# The Python client loop starts faster than the vectorised one, which matters for the short subprocess runs here.
FAST = [*TINY_MOCO, "--client_exec", "loop", "--num_client", "3", "--batch_size", "8"]
SUBPROCESS_TIMEOUT_S = 180


# ------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """One intra-op thread here and in the child processes: CPU results then match bit for bit across processes
    (reduction order depends on the thread count), and tiny models do not stall on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def overflow_at(trainer, step: int) -> None:
    """Make the loss of global step `step` (1-based) infinite, as an fp16 overflow or a diverging run would."""
    original = trainer.method.compute_loss
    calls = {"count": trainer.global_step}

    def compute_loss(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        calls["count"] += 1
        return (loss * float("inf") if calls["count"] == step else loss), stats

    trainer.method.compute_loss = compute_loss


def server_weights(trainer) -> dict[str, torch.Tensor]:
    """A copy of the server's trainable weights."""
    return {name: p.detach().clone() for name, p in trainer.method.server.named_parameters()}


# ------------------------------------------------------------------------------------------- signals and resume
# Runs the real entry script in a child process; each step also writes its number to a progress file and pauses,
# so the test can send SIGTERM from outside while the run is mid-epoch.
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


def start_slow_run(tmp_path: Path, argv: list[str], **popen: object) -> tuple[subprocess.Popen, Path]:
    """Start the slowed entry script; return the process once it has finished two steps."""
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_DRIVER.format(repo=str(REPO_ROOT)))
    progress = tmp_path / "progress.txt"
    child = subprocess.Popen([sys.executable, str(driver), str(progress), *argv], cwd=REPO_ROOT, env=entry_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
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
                              start_new_session=True)
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


def test_a_stop_before_the_first_step_saves_a_resumable_step_zero(tmp_path):
    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    trainer.stop.request(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="SIGINT received: stopped after step 0") as interrupted:
        trainer.train()
    assert interrupted.value.exit_code == 130
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["global_step"] == 0


def test_run_cli_exit_codes_for_interruptions(capsys):
    def interrupted():
        raise TrainingInterrupted("SIGTERM received: resume with: python run_sflmoco.py --resume", signal.SIGTERM)

    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted)
    assert exit_info.value.code == 143
    assert capsys.readouterr().err.strip().endswith("--resume")

    def keyboard():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_cli(keyboard)
    assert exit_info.value.code == 130 and "last complete checkpoint" in capsys.readouterr().err


def test_an_error_line_is_written_in_one_piece(monkeypatch):
    # torchrun's ranks share one stderr: a line written in two pieces can be cut by another rank's line.
    writes: list[str] = []

    class Stream:
        def write(self, text: str) -> None:
            writes.append(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Stream())
    with pytest.raises(SystemExit):
        exit_with_error("cannot write x")
    assert writes == ["error: cannot write x\n"]


# --------------------------------------------------------------------------------------------- atomic checkpoints
def test_a_save_failing_before_the_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_atomic({"format": 1, "weights": torch.ones(3)}, path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk vanished")

    monkeypatch.setattr(checkpoint_module.os, "replace", crash)
    with pytest.raises(UserError, match=rf"cannot write .*{CHECKPOINT_NAME} \(disk vanished\); the previous "):
        save_atomic({"format": 1, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["weights"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # the temporary file is gone


def test_a_save_failing_while_writing_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_atomic({"format": 1, "weights": torch.ones(3)}, path)
    with pytest.raises(Exception):
        save_atomic({"format": 1, "weights": torch.zeros(3), "unpicklable": lambda: None}, path)
    assert torch.equal(load_checkpoint(path)["weights"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]


def test_a_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    real_save = torch.save
    saves = []

    def disk_fills_after_the_first_checkpoint(state, stream, *args, **kwargs):
        saves.append(state["global_step"])
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(state, stream, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_fills_after_the_first_checkpoint)
    run_dir = tmp_path / "run"
    code, line = cli_error(run_sflmoco.main, [*FAST, "--output_dir", str(run_dir)], capsys)
    monkeypatch.undo()
    path = run_dir / CHECKPOINT_NAME
    assert code == 2 and f"cannot write {path} (No space left on device)" in line and "unchanged" in line
    assert len(saves) == 2 and load_checkpoint(path)["global_step"] == saves[0] > 0  # epoch 1's checkpoint
    assert stale_temporaries(path) == []


def test_text_files_of_a_run_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "old")

    def crash(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(files_module.os, "fsync", crash)
    with pytest.raises(UserError, match="cannot write .*metrics.json \\(Read-only file system\\)"):
        write_text_atomic(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by the group as any file the user writes


# pytest reports a thread's uncaught exception (which would print a traceback) as this warning: make it a failure.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_tensorboard_write_is_one_warning_and_training_goes_on(tmp_path, caplog):
    from tensorboard.summary.writer import record_writer

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    trainer.args.max_steps = 6
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(record_writer.RecordWriter, "write", full_disk)  # the writer thread's file writes fail
        trainer.train()
        trainer.close()
    assert trainer.global_step == 6 and load_checkpoint(tmp_path / CHECKPOINT_NAME)["global_step"] == 6
    warnings = [r.getMessage() for r in caplog.records if "tensorboard logging stopped" in r.getMessage()]
    assert warnings == [f"tensorboard logging stopped: cannot write {tmp_path / 'tensorboard'} "
                        "(No space left on device); training goes on"]


KILLED_SAVE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
from functions.core import checkpoint
path = sys.argv[1]
checkpoint.save_atomic({{"format": 1, "weights": torch.ones(3)}}, path)
checkpoint.os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # die between write and rename
checkpoint.save_atomic({{"format": 1, "weights": torch.zeros(3)}}, path)
"""


def test_a_process_killed_between_write_and_rename_leaves_the_previous_checkpoint(tmp_path):
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE.format(repo=str(REPO_ROOT)))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / CHECKPOINT_NAME
    result = subprocess.run([sys.executable, str(script), str(path)], env=entry_env(), capture_output=True,
                            timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert torch.equal(load_checkpoint(path)["weights"], torch.ones(3))
    leftovers = stale_temporaries(path)
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the new state was written, never renamed
    assert remove_stale_temporaries(path) == leftovers
    assert sorted(run_dir.iterdir()) == [path]


# -------------------------------------------------------------------------------------------- corrupt checkpoints
def test_resume_from_a_truncated_checkpoint_is_refused_and_leaves_it_untouched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / CHECKPOINT_NAME
    torch.save({"format": 1, "weights": torch.randn(4000)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = path.read_bytes()
    result = run_entry("run_sflmoco.py", [*FAST, "--output_dir", str(run_dir), "--resume"])
    assert_clean_user_error(result, str(path), "corrupt or truncated")
    assert path.read_bytes() == before
    assert not (run_dir / "config.yaml").exists()  # refused before the run folder changed


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "corrupt or truncated"),
    ("foreign", "not a checkpoint of this project"),
    ("incomplete", "is incomplete (no "),
])
def test_resume_from_a_foreign_or_incomplete_checkpoint_is_refused(tmp_path, capsys, content, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / CHECKPOINT_NAME
    if content == "foreign":
        torch.save([torch.ones(2)], path)  # a valid torch file, but not a run's checkpoint
    elif content == "incomplete":
        torch.save({"format": 1, "epoch": 0}, path)
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    code, line = cli_error(run_sflmoco.main, [*FAST, "--output_dir", str(run_dir), "--resume"], capsys)
    assert code == 2 and message in line and str(path) in line
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------------- numerical faults
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    trainer.args.max_steps = 1
    trainer.train()
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    trainer.args.max_steps = 4
    overflow_at(trainer, step=3)
    with pytest.raises(UserError, match=r"the loss became inf at step 3; .*last good checkpoint .* \(step 1\)"):
        trainer.train()
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    trainer.save_checkpoint()
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with torch.no_grad():
        next(trainer.method.server.parameters())[0].fill_(float("nan"))
    with pytest.raises(UserError, match=r"method\.server\..* became non-finite by step 0; stopped without saving"):
        trainer.save_checkpoint()
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good


def test_fp16_overflow_steps_are_skipped_counted_and_logged_not_fatal(tmp_path):
    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    # CUDA is not needed to exercise the loss-scaling bookkeeping: the CPU GradScaler skips steps the same way.
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    trainer.args.max_steps = 1
    trainer.train()
    after_first = server_weights(trainer)
    overflow_at(trainer, step=2)
    trainer.args.max_steps = 2
    trainer.train()
    for name, value in server_weights(trainer).items():
        assert torch.equal(value, after_first[name]), name  # the overflowing step did not update the server
    trainer.args.max_steps = 3
    trainer.train()
    assert any(not torch.equal(value, after_first[name]) for name, value in server_weights(trainer).items())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_steps"] == [[1, 0], [2, 1], [3, 1]]
    assert [step for step, _ in metrics["train_loss"]] == [1, 3]  # the skipped step's inf loss is not logged
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["skipped_steps"] == 1
    assert trainer.precision.scaler.get_scale() == 2.0 ** 7


def test_fp16_stops_when_the_loss_scale_shows_divergence(tmp_path):
    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    overflow_at(trainer, step=1)
    trainer.args.max_steps = 2
    with pytest.raises(UserError, match=r"fp16 loss scale fell to 0\.5 by step 1 \(1 steps skipped\)"):
        trainer.train()
    assert not (tmp_path / CHECKPOINT_NAME).exists()


# --------------------------------------------------------------------------------------------- bad input table
def test_unknown_config_key_exits_2_without_traceback(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("num_client: 3\nlearning_rate: 0.1\n")
    result = run_entry("run_sflswav.py", ["--config", str(preset), "--output_dir", str(tmp_path / "run")])
    assert_clean_user_error(result, "unknown option 'learning_rate'", str(preset))


def test_missing_data_offline_exits_2_at_once(tmp_path):
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    started = time.monotonic()
    result = run_entry("run_sflmoco.py", [*FAST, "--dataset", "cifar10", "--data_dir", str(data_dir),
                                          "--output_dir", str(tmp_path / "run")])
    assert_clean_user_error(result, str(data_dir / "cifar-10-batches-py"), "download disabled", "--data_dir")
    assert time.monotonic() - started < 60
    assert list(data_dir.iterdir()) == []


def test_missing_data_when_the_download_fails_is_one_line(tmp_path, capsys, monkeypatch):
    def offline(url: str, destination: Path, timeout_s: float = 0.0) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_file", offline)
    monkeypatch.delenv(NO_DOWNLOAD_ENV, raising=False)
    code, line = cli_error(run_sflmoco.main, [*FAST, "--dataset", "cifar10", "--data_dir", str(tmp_path / "none"),
                                              "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "could not be downloaded" in line and "name resolution" in line


def test_truncated_cifar_file_exits_2_naming_it(tmp_path):
    shutil.copytree(SAMPLE_CIFAR10, tmp_path / "data")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:50_000])
    result = run_entry("run_sflmoco.py", [*FAST, "--dataset", "cifar10", "--data_dir", str(tmp_path / "data"),
                                          "--output_dir", str(tmp_path / "run")])
    assert_clean_user_error(result, str(batch), "truncated")


def test_cifar_file_of_the_wrong_layout_is_one_line(tmp_path, capsys):
    shutil.copytree(SAMPLE_CIFAR10, tmp_path / "data")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "test_batch"
    with open(batch, "wb") as stream:
        pickle.dump({"data": np.zeros((4, 1024), dtype=np.uint8), "labels": [0, 1, 2, 3]}, stream, protocol=2)
    code, line = cli_error(run_sflmoco.main, [*FAST, "--dataset", "cifar10", "--data_dir", str(tmp_path / "data"),
                                              "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 2 and str(batch) in line and "wrong layout" in line


def test_use_dali_without_dali_exits_2(tmp_path):
    # A package named nvidia ahead of the installed one makes `import nvidia.dali` fail as on a machine without it.
    shadow = tmp_path / "shadow" / "nvidia"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'nvidia.dali'\")\n")
    result = run_entry("run_sflmoco.py", [*FAST, "--use_dali", "--output_dir", str(tmp_path / "run")],
                       PYTHONPATH=str(shadow.parent))
    assert_clean_user_error(result, "--use_dali needs NVIDIA DALI")


@pytest.mark.parametrize("main, argv, message", [
    (run_sflswav.main, [*TINY_SWAV, "--nmb_crops", "2", "6", "--size_crops", "32"],
     "the crop lists must have the same length"),
    (run_sflswav.main, [*TINY_SWAV, "--nmb_crops", "2", "--size_crops", "32", "--min_scale_crops", "0.2",
                        "--max_scale_crops", "1", "--crops_for_assign", "0", "2"],
     "--crops_for_assign 2 is out of range: there are 2 crops"),
    (run_sflmoco.main, [*FAST, "--cutlayer", "10"], "--cutlayer 10 is past ResNet18"),
    (run_sflmoco.main, [*FAST, "--num_client", "600"], "cannot split 512 samples across 600 clients"),
])
def test_option_contradictions_exit_2_with_one_line(tmp_path, capsys, main, argv, message):
    code, line = cli_error(main, [*argv, "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 2 and message in line


def test_unwritable_output_dir_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, line = cli_error(run_sflmoco.main, [*FAST, "--output_dir", str(blocker / "run")], capsys)
    assert code == 2 and f"--output_dir {blocker / 'run'} is not writable" in line


def test_a_batch_larger_than_a_shard_wraps_with_distinct_augmentations():
    # Documented behaviour, not an error: a client reads its shard as an endless stream, so a batch wraps around.
    schedule = FederatedSchedule([np.array([3, 7, 9]), np.arange(10, 30)], [8, 8], 1.0, steps_per_epoch=2, seed=0)
    (client, indices, keys), _ = schedule.step_plan(0, 0)
    assert client == 0 and len(indices) == 8
    assert set(indices.tolist()) == {3, 7, 9} and np.bincount(indices).max() >= 3
    assert len(set(keys.tolist())) == 8  # every repeat is its own stream position, so its own augmentation
    for start in range(0, 6, 3):  # each full pass over the shard is a permutation of it
        assert sorted(indices[start:start + 3].tolist()) == [3, 7, 9]


def test_a_batch_larger_than_a_shard_is_announced_and_trains(tmp_path):
    import logging

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("sfl")
    handler = Collect()
    logger.addHandler(handler)
    try:
        trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "4", "--batch_size", "160")
    finally:
        logger.removeHandler(handler)
    assert any("4 of 4 clients hold fewer samples than their batch (smallest: 128 samples, batch 160)" in message
               for message in records), records
    batch = next(trainer.data.loaders.train.epoch(0))
    assert batch.rows_per_client == [160] * 4
    loss, _ = trainer.train_step(batch)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------- determinism
def test_the_same_seed_gives_the_same_partition_and_first_losses_on_cpu(tmp_path):
    def first_losses(name: str, seed: str) -> tuple[str, list[float]]:
        trainer = moco_trainer(tmp_path / name, "--client_exec", "loop", "--num_client", "3", "--batch_size", "8",
                               "--partition", "dirichlet", "--seed", seed)
        trainer.set_learning_rates(0, 0)
        batches = trainer.data.loaders.train.epoch(0)
        return trainer.data.partition_hash, [float(trainer.train_step(next(batches))[0]) for _ in range(2)]

    hash_a, losses_a = first_losses("a", "11")
    hash_b, losses_b = first_losses("b", "11")
    hash_c, losses_c = first_losses("c", "12")
    assert hash_a == hash_b and losses_a == losses_b
    assert hash_c != hash_a and losses_c != losses_a
