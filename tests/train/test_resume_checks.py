"""Whether a saved run may be continued: the same method, the same configuration."""
from __future__ import annotations

import shutil

from entry_runs import cli_error
from paths import FIXTURES
from sfl_helpers import TINY_SWAV

import run_sflswav
from functions.core.checkpoint import CHECKPOINT_NAME


def test_a_checkpoint_of_the_other_method_is_named_on_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copyfile(FIXTURES / "checkpoint_format1_moco.pt", run_dir / CHECKPOINT_NAME)
    code, line = cli_error(run_sflswav.main, [*TINY_SWAV, "--output_dir", str(run_dir), "--resume"], capsys)
    assert code == 2 and "is a checkpoint of method 'moco', not 'swav'; resume it with run_sflmoco.py" in line
    assert len(line) < 300
