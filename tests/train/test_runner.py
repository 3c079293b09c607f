"""The runner: starting, resuming and evaluating a run, and its one-line refusals."""
from __future__ import annotations

import json

from entry_runs import FAST, SUBPROCESS_TIMEOUT_S, cli_error, entry_env
from forked_commands import TORCHRUN_FORKED, run_forked
from paths import REPO_ROOT, SAMPLE_CIFAR10

import run_sflmoco
from functions.core.checkpoint import (
    CHECKPOINT_NAME,
)
from functions.train import evaluations


def test_unwritable_output_dir_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, line = cli_error(run_sflmoco.main, [*FAST, "--output_dir", str(blocker / "run")], capsys)
    assert code == 2 and f"--output_dir {blocker / 'run'} is not writable" in line


def test_eval_only_takes_the_runs_data_dir_and_this_commands_evaluation_options(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_sflmoco.main([*FAST, "--dataset", "cifar10", "--data_dir", str(SAMPLE_CIFAR10), "--max_steps", "1",
                      "--knn_k", "30", "--knn_t", "0.2", "--output_dir", str(run_dir)])
    monkeypatch.setenv("SFL_NO_DOWNLOAD", "1")  # ./data does not hold CIFAR-10: reading it would fail
    monkeypatch.chdir(tmp_path)
    asked = []
    real_knn = evaluations.knn_accuracy
    monkeypatch.setattr(evaluations, "knn_accuracy", lambda *a, **k: asked.append(k) or real_knn(*a, **k))
    results_dir = tmp_path / "evaluated"
    results = run_sflmoco.main(["--eval_only", "--checkpoint", str(run_dir / CHECKPOINT_NAME), "--knn_k", "7",
                                "--knn_t", "0.5", "--output_dir", str(results_dir), "--skip_linear"])
    assert asked == [{"k": 7, "temperature": 0.5}]
    assert json.loads((results_dir / "metrics.json").read_text())["final"]["knn_acc"] == results["knn_acc"]
    assert not (run_dir / "eval_only").exists()
    run_sflmoco.main(["--eval_only", "--checkpoint", str(run_dir / CHECKPOINT_NAME), "--skip_linear"])
    assert asked[-1] == {"k": 30, "temperature": 0.2}  # not given here: the run's own
    assert (run_dir / "eval_only" / "metrics.json").is_file()


def test_torchrun_prints_a_bad_option_once(tmp_path):
    # torchrun with its workers forked from it, itself forked from the tests' fork server (forked_commands.py)
    result = run_forked([TORCHRUN_FORKED, "--nproc_per_node", "2", str(REPO_ROOT / "run_sflmoco.py"),
                         "--no_such_option", "--output_dir", str(tmp_path / "run")], entry_env(),
                        timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: unrecognized arguments: --no_such_option (see run_sflmoco.py --help)"], result.stderr


def test_a_new_run_refuses_a_best_checkpoint_it_did_not_write(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint_best.pt").write_bytes(b"another run's best epoch")
    argv = [*FAST, "--max_steps", "1", "--eval_protocol", "mocosfl", "--eval_freq", "1", "--output_dir", str(run_dir)]
    code, line = cli_error(run_sflmoco.main, argv, capsys)
    assert code == 2 and f"{run_dir / 'checkpoint_best.pt'} is left from an earlier run" in line
    assert (run_dir / "checkpoint_best.pt").read_bytes() == b"another run's best epoch"
    assert not (run_dir / CHECKPOINT_NAME).exists()
