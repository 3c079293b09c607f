"""Logs: tensorboard failures cost one warning, never the run."""
from __future__ import annotations

import errno
import os
import sys

import pytest
from entry_runs import FAST, cli_error
from sfl_helpers import moco_trainer

import run_sflmoco
from functions.core.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
)


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


def test_without_tensorboard_training_goes_on_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an import of it now fails
    results = run_sflmoco.main([*FAST, "--output_dir", str(tmp_path / "run"), "--max_steps", "2"])
    assert results["step"] == 2
    assert capsys.readouterr().out.count("tensorboard logging is off: it cannot be imported here") == 1


def test_a_symlinked_output_log_is_refused_and_its_target_left_alone(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (run_dir / "output.log").symlink_to(victim)
    code, line = cli_error(run_sflmoco.main, [*FAST, "--max_steps", "1", "--output_dir", str(run_dir)], capsys)
    assert code == 2 and "output.log is a symbolic link" in line
    assert victim.read_text() == "keep me\n"
