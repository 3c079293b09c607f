"""Errors a user can cause: one line, exit code 2, never a traceback."""
from __future__ import annotations

import signal
import sys

import pytest

from functions.core.errors import TrainingInterrupted, exit_with_error, run_cli


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
