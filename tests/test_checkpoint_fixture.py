"""Checkpoints written before the registries (format 1, tests/fixtures): SwAV's still resume and evaluate, with the
numbers the code that wrote them printed; MoCo's, whose head predates MocoSFL's heads, are refused in one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import run_sflmoco
import run_sflswav
from functions.core.checkpoint import CHECKPOINT_NAME

FIXTURES = Path(__file__).resolve().parent / "fixtures"
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
    from functions.core.errors import run_cli

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
