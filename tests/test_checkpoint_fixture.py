"""Checkpoints written before the registries (format 1, tests/fixtures) still resume and evaluate, with the numbers
the code that wrote them printed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import run_sflmoco
import run_sflswav
from functions.checkpoint import CHECKPOINT_NAME

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "checkpoint_format1.json").read_text())
ENTRIES = {"moco": run_sflmoco.main, "swav": run_sflswav.main}


@pytest.mark.parametrize("method", ["moco", "swav"])
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


@pytest.mark.parametrize("method", ["moco", "swav"])
def test_a_format_1_checkpoint_evaluates_with_either_entry_script(tmp_path, method):
    expected = EXPECTED[method]
    checkpoint = tmp_path / CHECKPOINT_NAME
    shutil.copyfile(FIXTURES / expected["checkpoint"], checkpoint)
    for entry in ENTRIES.values():  # the checkpoint names its method; the entry script does not matter
        results = entry(["--eval_only", "--checkpoint", str(checkpoint), "--skip_linear", "--num_workers", "0"])
        assert results["step"] == expected["saved_at_step"]
        assert results["knn_acc"] == pytest.approx(expected["eval_only_knn_acc"], abs=1.0)
