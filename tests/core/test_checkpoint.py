"""Checkpoints written before the registries (format 1, tests/fixtures): SwAV's still resume and evaluate, with the
numbers the code that wrote them printed; MoCo's, whose head predates MocoSFL's heads, are refused in one line."""
from __future__ import annotations

import copy
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
from entry_runs import FAST, SUBPROCESS_TIMEOUT_S, assert_clean_user_error, cli_error, entry_env, run_entry
from paths import FIXTURES, REPO_ROOT

import run_sflmoco
import run_sflswav
from functions.core import checkpoint as checkpoint_module
from functions.core.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    remove_stale_temporaries,
    save_atomic,
    stale_temporaries,
)
from functions.core.errors import UserError, run_cli

FIXTURES = FIXTURES
EXPECTED = json.loads((FIXTURES / "checkpoint_format1.json").read_text())
ENTRIES = {"moco": run_sflmoco.main, "swav": run_sflswav.main}


@pytest.mark.parametrize("method", ["swav"])
def test_a_format_1_checkpoint_resumes_to_the_same_losses(tmp_path, method):
    expected = EXPECTED[method]
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    shutil.copyfile(FIXTURES / expected["checkpoint"], output_dir / CHECKPOINT_NAME)
    results = ENTRIES[method]([*expected["options"], "--max_steps", str(expected["resumed_to_step"]),
                               "--output_dir", str(output_dir), "--resume"])
    metrics = json.loads((output_dir / "metrics.json").read_text())
    resumed = [entry for entry in metrics["train_loss"] if entry[0] > expected["saved_at_step"]]
    assert [step for step, _ in resumed] == [step for step, _ in expected["losses_after_resume"]]
    for (_, loss), (_, expected_loss) in zip(resumed, expected["losses_after_resume"]):
        assert loss == pytest.approx(expected_loss, rel=1e-4)
    assert results["step"] == expected["resumed_to_step"]
    assert results["knn_acc"] == pytest.approx(expected["final_knn_acc"], abs=1.0)


@pytest.mark.parametrize("method", ["swav"])
def test_a_format_1_checkpoint_evaluates_with_either_entry_script(tmp_path, method):
    expected = EXPECTED[method]
    checkpoint = tmp_path / CHECKPOINT_NAME
    shutil.copyfile(FIXTURES / expected["checkpoint"], checkpoint)
    for entry in ENTRIES.values():  # the checkpoint names its method; the entry script does not matter
        results = entry(["--eval_only", "--checkpoint", str(checkpoint), "--skip_linear", "--num_workers", "0"])
        assert results["step"] == expected["saved_at_step"]
        assert results["knn_acc"] == pytest.approx(expected["eval_only_knn_acc"], abs=1.0)


def test_a_format_1_moco_checkpoint_is_refused_in_one_line(tmp_path, capsys):

    expected = EXPECTED["moco"]
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    shutil.copyfile(FIXTURES / expected["checkpoint"], output_dir / CHECKPOINT_NAME)
    for argv in ([*expected["options"], "--max_steps", "6", "--output_dir", str(output_dir), "--resume"],
                 ["--eval_only", "--checkpoint", str(output_dir / CHECKPOINT_NAME), "--skip_linear"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: run_sflmoco.main(argv))
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert exit_info.value.code == 2 and len(errors) == 1
        assert "written before the MoCo heads and the symmetric loss followed MocoSFL" in errors[0]


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


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> dict:
    """The checkpoint of a one-step run (read once for the edited copies below)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    run_sflmoco.main([*FAST, "--max_steps", "1", "--output_dir", str(run_dir)])
    return load_checkpoint(run_dir / CHECKPOINT_NAME)


def _edited(state: dict, edit: str) -> dict:
    """A copy of `state` with one value a foreign or hand-edited file could hold."""
    state = copy.deepcopy(state)
    if edit == "num_client":
        state["args"]["num_client"] = "four"
    elif edit == "rng":
        state["rng"]["numpy"] = ("MT19937", "not a state")
    elif edit == "metrics":
        state["metrics"] = 5
    elif edit == "epoch":
        state["epoch"] = "one"
    elif edit == "nan":
        model = state["clients"]["models"][0]
        model[next(iter(model))].fill_(float("nan"))
    return state


@pytest.mark.parametrize("edit, how, fragment", [
    ("num_client", "eval_only", "its option num_client must be a whole number, got 'four'"),
    ("rng", "resume", "rng.numpy is not a NumPy random state"),
    ("metrics", "eval_only", "metrics is not a mapping"),
    ("epoch", "resume", "epoch is 'one', not a count"),
    ("nan", "eval_only", "holds non-finite weights (clients.models[0]."),
])
def test_a_checkpoint_with_values_of_the_wrong_kind_is_one_line(tmp_path, capsys, tiny_checkpoint, edit, how,
                                                                 fragment):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / CHECKPOINT_NAME
    torch.save(_edited(tiny_checkpoint, edit), path)
    argv = (["--eval_only", "--checkpoint", str(path), "--num_workers", "0"] if how == "eval_only"
            else [*FAST, "--max_steps", "2", "--output_dir", str(run_dir), "--resume"])
    code, line = cli_error(run_sflmoco.main, argv, capsys)
    assert code == 2 and str(path) in line and fragment in line, line
    assert not (run_dir / "eval_only" / "metrics.json").exists()
