"""Bad input and faults a user can cause: one `error:` line and exit 2, nothing run that should not run, nothing
lost, no silently wrong result."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from sfl_helpers import TINY_SWAV, moco_trainer
from test_robustness import FAST, SUBPROCESS_TIMEOUT_S, assert_clean_user_error, cli_error, entry_env

import run_sflmoco
import run_sflswav
from functions.core import checkpoint as checkpoint_module
from functions.core.checkpoint import CHECKPOINT_NAME, load_checkpoint
from functions.core.errors import TrainingInterrupted
from functions.core.files import RunFolderLock

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAMPLE_CIFAR10 = REPO_ROOT / "sample_data" / "cifar10"


# ------------------------------------------------------------------------------------------ security and data loss
class RunsACommand:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint could do with any command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["eval_only", "resume"])
def test_a_crafted_checkpoint_runs_nothing_and_is_refused_in_one_line(tmp_path, capsys, how):
    marker = tmp_path / "PWNED"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    crafted = run_dir / CHECKPOINT_NAME
    torch.save({"format": 1, "payload": RunsACommand(marker)}, crafted)
    argv = (["--eval_only", "--checkpoint", str(crafted)] if how == "eval_only"
            else [*FAST, "--output_dir", str(run_dir), "--resume"])
    code, line = cli_error(run_sflmoco.main, argv, capsys)
    assert code == 2 and f"refused to read {crafted}" in line and "system" in line
    assert not marker.exists()


def test_the_numpy_random_state_of_a_real_checkpoint_still_loads():
    state = load_checkpoint(FIXTURES / "checkpoint_format1_swav.pt")
    assert state["rng"]["numpy"][1].dtype.name == "uint32"


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds the run-folder lock of `folder` until its stdin closes."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from functions.core.files import RunFolderLock; "
            "lock = RunFolderLock(sys.argv[2]); lock.acquire(); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(REPO_ROOT), str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_folder_in_use_is_refused_and_changes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_sflmoco.main([*FAST, "--output_dir", str(run_dir), "--max_steps", "1"])
    files_of_the_run = lambda: {path.name: path.read_bytes() for path in run_dir.iterdir()  # noqa: E731
                                if path.is_file() and path.name != RunFolderLock.FILE_NAME}
    before = files_of_the_run()
    holder = hold_lock(run_dir)
    try:
        for extra in (["--resume", "--max_steps", "2"], ["--seed", "9"]):
            code, line = cli_error(run_sflmoco.main, [*FAST, "--output_dir", str(run_dir), *extra], capsys)
            assert code == 2 and f"{run_dir} is in use by a run that is still going (pid {holder.pid}" in line
        eval_dir = tmp_path / "evaluation"
        eval_dir.mkdir()
        eval_holder = hold_lock(eval_dir)
        try:
            code, line = cli_error(run_sflmoco.main, ["--eval_only", "--checkpoint", str(run_dir / CHECKPOINT_NAME),
                                                      "--output_dir", str(eval_dir), "--skip_linear"], capsys)
            assert code == 2 and "is in use" in line
        finally:
            eval_holder.communicate("")
    finally:
        holder.communicate("")
    assert files_of_the_run() == before
    run_sflmoco.main([*FAST, "--output_dir", str(run_dir), "--resume", "--max_steps", "2"])  # free again


def test_the_lock_goes_with_the_process(tmp_path):
    lock = RunFolderLock(tmp_path)
    lock.acquire()
    lock.release()
    holder = hold_lock(tmp_path)
    holder.kill()
    holder.wait()
    RunFolderLock(tmp_path).acquire()  # no stale lock left by a killed run


def test_a_full_disk_inside_torch_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    run_sflmoco.main([*FAST, "--output_dir", str(run_dir), "--max_steps", "1"])
    previous = (run_dir / CHECKPOINT_NAME).read_bytes()
    real_write_atomic = checkpoint_module.write_atomic

    class FullDisk:
        """The checkpoint's file, failing as a full disk does once some bytes went through (torch.save's zip
        writer then reports a RuntimeError)."""

        def __init__(self, stream):
            self.stream, self.written = stream, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.stream.write(data)

        def flush(self):
            self.stream.flush()

    monkeypatch.setattr(checkpoint_module, "write_atomic",
                        lambda path, write: real_write_atomic(path, lambda stream: write(FullDisk(stream))))
    code, line = cli_error(run_sflmoco.main, [*FAST, "--output_dir", str(run_dir), "--resume", "--max_steps", "2"],
                           capsys)
    assert code == 2 and line == (f"error: cannot write {run_dir / CHECKPOINT_NAME} (No space left on device); "
                                  f"the previous {CHECKPOINT_NAME}, if any, is unchanged")
    assert (run_dir / CHECKPOINT_NAME).read_bytes() == previous
    assert not [path for path in run_dir.iterdir() if path.name.endswith(".tmp")]


# -------------------------------------------------------------------------------------------- silent wrong results
@pytest.mark.parametrize("entry, yaml_line, fragment", [
    ("moco", 'cos: "false"', "cos must be true or false, got 'false'"),
    ("moco", 'skip_linear: "no"', "skip_linear must be true or false"),
    ("moco", "client_exec: fast", "client_exec must be one of auto, vmap, loop, got 'fast'"),
    ("moco", "max_steps: 2.7", "max_steps must be a whole number, got 2.7"),
    ("moco", "K: 1e3", "K must be a whole number, got '1e3'"),
    ("moco", "batch_size: [4, 8]", "batch_size must be a whole number"),
    ("moco", "num_client: 2.5", "num_client must be a whole number"),
    ("moco", "lr: null", "lr needs a value"),
    ("moco", "seed: null", "seed needs a value"),
    ("moco", "milestones: 5", "milestones must be a list"),
    ("moco", "output_dir: 123", "output_dir must be a string"),
    ("swav", "nmb_crops: 2", "nmb_crops must be a list of at least one value"),
])
def test_config_values_of_the_wrong_type_are_refused_naming_the_file(tmp_path, capsys, entry, yaml_line, fragment):
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml_line + "\n")
    main = run_sflmoco.main if entry == "moco" else run_sflswav.main
    code, line = cli_error(main, ["--config", str(preset), "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 2 and f"config file {preset}: {fragment}" in line
    assert not (tmp_path / "run").exists()


def test_a_binary_config_file_is_one_line(tmp_path, capsys):
    preset = tmp_path / "preset.yaml"
    preset.write_bytes(bytes(range(256)))
    code, line = cli_error(run_sflmoco.main, ["--config", str(preset)], capsys)
    assert code == 2 and f"config file {preset} is not a text file" in line


@pytest.mark.parametrize("entry, argv, fragment", [
    ("swav", ["--use_swav_scheduler", "--warmup_epochs", "0", "--final_s_lr", "-1"], "--final_s_lr must be in [0, inf)"),
    ("moco", ["--milestones", "1", "--s_gamma", "-1", "--c_gamma", "-1"], "--s_gamma must be in (0, inf)"),
    ("moco", ["--momentum", "2"], "--momentum must be in [0, 1) (got 2.0)"),
    ("moco", ["--log_freq", "0"], "--log_freq must be in [1, inf)"),
    ("moco", ["--eval_freq", "-1"], "--eval_freq must be in [0, inf)"),
    ("swav", ["--use_swav_scheduler", "--warmup_epochs", "500", "--num_epoch", "2"],
     "--warmup_epochs must be in [0, 2] (got 500)"),
    ("moco", ["--lr", "nan"], "--lr must be in (0, inf) (got nan)"),
    ("moco", ["--knn_k", "0"], "--knn_k must be in [1, inf)"),
    ("moco", ["--knn_t", "0"], "--knn_t must be in (0, inf)"),
    ("moco", ["--seed", "-1"], "--seed must be in [0, "),
    ("moco", ["--milestones", "0"], "--milestones are epochs, each at least 1"),
])
def test_impossible_numbers_are_refused_before_anything_runs(tmp_path, capsys, entry, argv, fragment):
    main = run_sflmoco.main if entry == "moco" else run_sflswav.main
    code, line = cli_error(main, [*argv, "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 2 and fragment in line
    assert not (tmp_path / "run").exists()


def test_a_path_that_is_not_utf8_is_one_line(tmp_path, capsys):
    folder = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff")  # how Python hands such a name over
    code, line = cli_error(run_sflmoco.main, [*FAST, "--output_dir", folder], capsys)
    assert code == 2 and "--output_dir" in line and "UTF-8" in line


def test_eval_only_takes_the_runs_data_dir_and_this_commands_evaluation_options(tmp_path, monkeypatch):
    from functions.evaluation import probes as evaluation

    run_dir = tmp_path / "run"
    run_sflmoco.main([*FAST, "--dataset", "cifar10", "--data_dir", str(SAMPLE_CIFAR10), "--max_steps", "1",
                      "--knn_k", "30", "--knn_t", "0.2", "--output_dir", str(run_dir)])
    monkeypatch.setenv("SFL_NO_DOWNLOAD", "1")  # ./data does not hold CIFAR-10: reading it would fail
    monkeypatch.chdir(tmp_path)
    asked = []
    real_knn = evaluation.knn_accuracy
    monkeypatch.setattr(evaluation, "knn_accuracy", lambda *a, **k: asked.append(k) or real_knn(*a, **k))
    results_dir = tmp_path / "evaluated"
    results = run_sflmoco.main(["--eval_only", "--checkpoint", str(run_dir / CHECKPOINT_NAME), "--knn_k", "7",
                                "--knn_t", "0.5", "--output_dir", str(results_dir), "--skip_linear"])
    assert asked == [{"k": 7, "temperature": 0.5}]
    assert json.loads((results_dir / "metrics.json").read_text())["final"]["knn_acc"] == results["knn_acc"]
    assert not (run_dir / "eval_only").exists()
    run_sflmoco.main(["--eval_only", "--checkpoint", str(run_dir / CHECKPOINT_NAME), "--skip_linear"])
    assert asked[-1] == {"k": 30, "temperature": 0.2}  # not given here: the run's own
    assert (run_dir / "eval_only" / "metrics.json").is_file()


def test_resuming_with_another_num_epoch_is_refused_when_the_schedule_depends_on_it(tmp_path, capsys):
    cosine, steps = tmp_path / "cosine", tmp_path / "steps"
    run_sflmoco.main([*FAST, "--cos", "--output_dir", str(cosine), "--max_steps", "1"])
    code, line = cli_error(run_sflmoco.main, [*FAST, "--cos", "--output_dir", str(cosine), "--resume",
                                              "--num_epoch", "5", "--max_steps", "2"], capsys)
    assert code == 2 and "--num_epoch 2, this run has --num_epoch 5" in line
    run_sflmoco.main([*FAST, "--no-cos", "--milestones", "1", "--output_dir", str(steps), "--max_steps", "1"])
    resumed = run_sflmoco.main([*FAST, "--no-cos", "--milestones", "1", "--output_dir", str(steps), "--resume",
                                "--num_epoch", "5", "--max_steps", "2"])
    assert resumed["step"] == 2  # a MultiStepLR schedule does not depend on it: the run goes on


def test_a_resumed_epoch_reports_each_statistic_once_over_all_its_steps(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    steps = 6
    run_sflmoco.main([*FAST, "--output_dir", str(straight), "--max_steps", str(steps)])
    run_sflmoco.main([*FAST, "--output_dir", str(interrupted), "--max_steps", "2"])
    run_sflmoco.main([*FAST, "--output_dir", str(interrupted), "--max_steps", str(steps), "--resume"])
    expected, actual = (json.loads((folder / "metrics.json").read_text()) for folder in (straight, interrupted))
    [(epoch, value)], [(expected_epoch, expected_value)] = actual["contrastive_acc"], expected["contrastive_acc"]
    assert epoch == expected_epoch == 1 and value == pytest.approx(expected_value)
    assert actual["train_loss"] == expected["train_loss"]


def test_resuming_a_checkpoint_of_step_zero_logs_the_first_knn_once(tmp_path):
    trainer = moco_trainer(tmp_path, "--eval_freq", "1", "--client_exec", "loop", "--num_client", "2",
                           "--batch_size", "8")
    real_log_knn = trainer.log_knn

    def log_knn_then_stop(epoch):  # a stop that arrives during the first kNN monitor
        accuracy = real_log_knn(epoch)
        trainer.stop.request(signal.SIGTERM)
        return accuracy

    trainer.log_knn = log_knn_then_stop
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["global_step"] == 0
    resumed = moco_trainer(tmp_path, "--eval_freq", "1", "--client_exec", "loop", "--num_client", "2",
                           "--batch_size", "8", "--max_steps", "1")
    resumed.load_state_dict(state)
    resumed.train()
    knn = json.loads((tmp_path / "metrics.json").read_text())["knn_acc"]
    assert [epoch for epoch, _ in knn] == [0]


# --------------------------------------------------------------------------------------- tracebacks and messages
def test_a_checkpoint_of_the_other_method_is_named_on_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copyfile(FIXTURES / "checkpoint_format1_moco.pt", run_dir / CHECKPOINT_NAME)
    code, line = cli_error(run_sflswav.main, [*TINY_SWAV, "--output_dir", str(run_dir), "--resume"], capsys)
    assert code == 2 and "is a checkpoint of method 'moco', not 'swav'; resume it with run_sflmoco.py" in line
    assert len(line) < 300


def test_without_tensorboard_training_goes_on_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an import of it now fails
    results = run_sflmoco.main([*FAST, "--output_dir", str(tmp_path / "run"), "--max_steps", "2"])
    assert results["step"] == 2
    assert capsys.readouterr().out.count("tensorboard logging is off: it cannot be imported here") == 1


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
    result = subprocess.run([sys.executable, str(script), where, name, *FAST, "--max_steps", "2", "--output_dir",
                             str(run_dir)], env=entry_env(), capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT_S)
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


def test_torchrun_prints_a_bad_option_once(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO_ROOT / "run_sflmoco.py"),
               "--no_such_option", "--output_dir", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=entry_env(), capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: unrecognized arguments: --no_such_option (see run_sflmoco.py --help)"], result.stderr


def test_an_unknown_option_is_one_line_not_argparse_usage(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "run_sflswav.py"), "--nmb_cropz", "2"], cwd=REPO_ROOT,
                            env=entry_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert_clean_user_error(result, "unrecognized arguments: --nmb_cropz 2", "run_sflswav.py --help")
    assert "usage:" not in result.stderr
