"""The sweep runner: presets x seeds as separate runs, one table (mean and std over seeds) and a kNN plot per
preset, and a sweep that was killed continues where it stopped."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from paths import REPO_ROOT

from functions.core.errors import UserError
from functions.train.sweep import main, mean_std
from functions.train.sweep_jobs import Job, build_jobs, parse_assignments, preset_method

TINY_COMMON = """dataset: synthetic
arch: ResNet18
width: 2
num_client: 2
batch_size: 8
data_proportion: 0.25
num_epoch: 2
eval_freq: 1
linear_epochs: 1
num_workers: 0
knn_k: 5
"""
TINY_MOCO = TINY_COMMON + "K: 32\nK_dim: 8\n"
TINY_SWAV = TINY_COMMON + "nmb_prototypes: 6\nfeat_dim: 8\nhidden_mlp: 16\n"


def presets(folder: Path) -> list[str]:
    (folder / "tiny_moco.yaml").write_text(TINY_MOCO)
    (folder / "tiny_swav.yaml").write_text(TINY_SWAV)
    return [str(folder / "tiny_moco.yaml"), str(folder / "tiny_swav.yaml")]


def sweep_command(preset_files: list[str], output_dir: Path) -> list[str]:
    return [sys.executable, "-m", "functions.train.sweep", "--presets", *preset_files, "--seeds", "0", "1",
            "--output_dir", str(output_dir)]


def test_a_killed_sweep_continues_and_summarises_every_seed(tmp_path: Path) -> None:
    files = presets(tmp_path)
    output_dir = tmp_path / "sweep"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    # First attempt: killed (SIGKILL, no chance to clean up) once the second run has saved its first epoch.
    sweep = subprocess.Popen(sweep_command(files, output_dir), cwd=REPO_ROOT, env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = output_dir / "tiny_moco" / "seed1"
    deadline = time.monotonic() + 240
    while not (second / "checkpoint_last.pt").is_file():
        assert sweep.poll() is None, sweep.stdout.read()
        assert time.monotonic() < deadline, "the second run never saved a checkpoint"
        time.sleep(0.05)
    sweep.kill()
    sweep.wait()
    # The run in progress was told to stop (it saves a checkpoint) and did not finish.
    deadline = time.monotonic() + 60
    while "interrupted" not in (second / "console.log").read_text():
        assert time.monotonic() < deadline, (second / "console.log").read_text()[-2000:]
        time.sleep(0.1)
    assert not json.loads((second / "metrics.json").read_text()).get("final")
    first_finished = (output_dir / "tiny_moco" / "seed0" / "metrics.json").stat().st_mtime_ns

    again = subprocess.run(sweep_command(files, output_dir), cwd=REPO_ROOT, env=environment, capture_output=True,
                           text=True, timeout=400)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "tiny_moco seed 0: done before, kept" in again.stdout
    assert "tiny_moco seed 1: resuming" in again.stdout
    assert "--resume" in (second / "console.log").read_text()
    assert (output_dir / "tiny_moco" / "seed0" / "metrics.json").stat().st_mtime_ns == first_finished

    finals = {(preset, seed): json.loads((output_dir / preset / f"seed{seed}" / "metrics.json").read_text())["final"]
              for preset in ("tiny_moco", "tiny_swav") for seed in (0, 1)}
    with open(output_dir / "results.csv", newline="") as handle:
        rows = {row["preset"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"tiny_moco", "tiny_swav"}
    for preset, row in rows.items():
        assert row["runs"] == "2/2" and row["method"] == preset.split("_")[1]
        values = [finals[(preset, seed)]["knn_acc"] for seed in (0, 1)]
        assert float(row["knn_acc_mean"]) == pytest.approx(sum(values) / 2)
        assert float(row["knn_acc_std"]) == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        assert float(row["linear_acc_mean"]) == pytest.approx((finals[(preset, 0)]["linear_acc"]
                                                               + finals[(preset, 1)]["linear_acc"]) / 2)
        assert (output_dir / preset / "knn.png").stat().st_size > 1000
    table = (output_dir / "results.md").read_text()
    assert "| tiny_moco | moco | 2/2 |" in table and "| tiny_swav | swav | 2/2 |" in table
    with open(output_dir / "runs.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4


def test_sweep_options_make_one_job_per_preset_variant_and_seed(tmp_path: Path) -> None:
    files = presets(tmp_path)
    jobs = build_jobs(files, [3, 4], parse_assignments(["num_epoch=5", "data_dir=/data"], "--set"),
                      parse_assignments(["cutlayer=[1,2]"], "--vary"), tmp_path / "out")
    assert [(job.group, job.seed) for job in jobs] == [
        ("tiny_moco_cutlayer1", 3), ("tiny_moco_cutlayer1", 4), ("tiny_moco_cutlayer2", 3), ("tiny_moco_cutlayer2", 4),
        ("tiny_swav_cutlayer1", 3), ("tiny_swav_cutlayer1", 4), ("tiny_swav_cutlayer2", 3), ("tiny_swav_cutlayer2", 4)]
    assert jobs[2].options["cutlayer"] == 2 and jobs[2].options["num_epoch"] == 5 and jobs[2].options["K"] == 32
    assert jobs[0].folder == tmp_path / "out" / "tiny_moco_cutlayer1" / "seed3"
    assert preset_method(Path(files[0])) == "moco" and preset_method(Path(files[1])) == "swav"
    assert preset_method(REPO_ROOT / "configs" / "swav_cpu.yaml") == "swav"
    from functions.train.sweep_jobs import job_command

    plain = job_command(jobs[0], Path("c.yaml"), resume=False, nproc_per_node=1)
    assert plain[1].endswith("run_sflmoco.py") and plain[-4:] == ["--seed", "3", "--output_dir", str(jobs[0].folder)]
    distributed = job_command(jobs[4], Path("c.yaml"), resume=True, nproc_per_node=2)
    assert distributed[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert distributed[5].endswith("run_sflswav.py") and distributed[-1] == "--resume"


def test_sweep_refuses_mistakes_in_one_line(tmp_path: Path) -> None:
    files = presets(tmp_path)
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_assignments(["num_epoch"], "--set")
    with pytest.raises(UserError, match="not found"):
        main(["--presets", str(tmp_path / "missing.yaml"), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match="twice"):
        main(["--presets", files[0], "--seeds", "1", "1", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match="list of values"):
        main(["--presets", files[0], "--vary", "cutlayer=2", "--output_dir", str(tmp_path / "o")])


def test_an_empty_or_root_like_sweep_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    files = presets(tmp_path)
    # --status writes nothing, whatever the folder.
    for folder, refusal in (("", "is empty: it would write the sweep into the current folder"),
                            ("/", "/ is the file system's root: the sweep would spread its files there"),
                            ("~", "~ is your home folder: the sweep would spread its files there")):
        with pytest.raises(UserError, match=f"^--output_dir {re.escape(refusal)}"):
            main(["--presets", files[0], "--status", "--output_dir", folder])


def test_mean_and_sample_std() -> None:
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    mean, std = mean_std([5.0])
    assert mean == 5.0 and math.isnan(std)


def test_a_folder_made_with_other_options_is_refused(tmp_path: Path) -> None:
    files = presets(tmp_path)
    [job] = build_jobs(files[:1], [0], {}, {}, tmp_path / "out")
    from functions.train.sweep_jobs import write_job_config

    write_job_config(job)
    [changed] = build_jobs(files[:1], [0], {"num_epoch": 9}, {}, tmp_path / "out")
    with pytest.raises(UserError, match="other options"):
        write_job_config(changed)


def test_sweep_stops_its_run_on_sigterm_and_says_how_to_continue(tmp_path: Path) -> None:
    files = presets(tmp_path)
    output_dir = tmp_path / "sweep"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    sweep = subprocess.Popen(sweep_command(files[:1], output_dir), cwd=REPO_ROOT, env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_folder = output_dir / "tiny_moco" / "seed0"
    deadline = time.monotonic() + 240
    while not (run_folder / "checkpoint_last.pt").is_file():
        assert sweep.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 128 + signal.SIGTERM, out + err
    assert "run the same command to continue" in err
    assert "seed 1" not in out  # the next run was not started


def finish_fake_run(job: Job, knn_acc: float = 50.0) -> None:
    """A run folder as a finished run leaves it (its sweep_config.yaml and final figures), without training."""
    from functions.train.sweep_jobs import write_job_config

    write_job_config(job)
    (job.folder / "metrics.json").write_text(json.dumps({"knn_acc": [[0, 10.0], [1, knn_acc]],
                                                         "final": {"knn_acc": knn_acc, "step": 2}}))


def summarise_command(preset_file: str, output_dir: Path, *extra: str) -> list[str]:
    return ["--presets", preset_file, "--seeds", "0", "--output_dir", str(output_dir), "--summarise_only", *extra]


def test_every_runs_options_are_checked_before_the_first_run_starts(tmp_path: Path) -> None:
    files = presets(tmp_path)
    output_dir = tmp_path / "sweep"
    with pytest.raises(UserError, match=r"^run tiny_moco_lr-1 seed 0: .*lr"):
        main(["--presets", files[0], "--seeds", "0", "--vary", "lr=[0.1,-1]", "--output_dir", str(output_dir)])
    with pytest.raises(UserError, match=r"^--set \(preset .*\): K must be a whole number"):
        main(["--presets", files[0], "--set", "K=many", "--output_dir", str(output_dir)])
    with pytest.raises(UserError, match=r"^unknown option 'widht' in --vary"):
        main(["--presets", files[0], "--vary", "widht=[2,4]", "--output_dir", str(output_dir)])
    assert not output_dir.exists()  # nothing started


def test_a_second_sweep_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    from functions.core.files import RunFolderLock

    files = presets(tmp_path)
    output_dir = tmp_path / "sweep"
    output_dir.mkdir()
    first = RunFolderLock(output_dir)
    first.acquire()
    try:
        with pytest.raises(UserError, match="in use"):
            main(summarise_command(files[0], output_dir))
    finally:
        first.release()
    assert main(summarise_command(files[0], output_dir)) == 0


def test_a_finished_run_made_with_other_options_is_not_kept_silently(tmp_path: Path) -> None:
    files = presets(tmp_path)
    output_dir = tmp_path / "sweep"
    [job] = build_jobs(files[:1], [0], {}, {}, output_dir)
    finish_fake_run(job)
    assert main(["--presets", files[0], "--seeds", "0", "--output_dir", str(output_dir)]) == 0  # kept
    with pytest.raises(UserError, match=r"holds a finished run made with other options \(lr: .*0.01 now\).*another "
                                        "--output_dir"):
        main(["--presets", files[0], "--seeds", "0", "--set", "lr=0.01", "--output_dir", str(output_dir)])
    assert "lr=0.01" not in (output_dir / "results.md").read_text()


def test_duplicate_variants_and_options_the_sweep_sets_are_refused(tmp_path: Path) -> None:
    files = presets(tmp_path)
    output_dir = tmp_path / "sweep"
    for width in (4, 4):
        [job] = build_jobs(files[:1], [0], {}, {"width": [width]}, output_dir)
        finish_fake_run(job)
    with pytest.raises(UserError, match=r"^--vary width lists 4 twice"):
        main(summarise_command(files[0], output_dir, "--vary", "width=[4,4]"))
    with pytest.raises(UserError, match=r"^--set seed: the sweep sets seed for each run; use --seeds"):
        main(summarise_command(files[0], output_dir, "--set", "seed=5"))
    with pytest.raises(UserError, match=r"^--vary output_dir: the sweep sets"):
        main(summarise_command(files[0], output_dir, "--vary", "output_dir=[a,b]"))
    with pytest.raises(UserError, match=r"^--vary lr and --set lr"):
        main(summarise_command(files[0], output_dir, "--vary", "lr=[0.1,0.2]", "--set", "lr=0.3"))


def test_run_folder_names_stay_inside_the_sweep_folder(tmp_path: Path) -> None:
    import re

    files = presets(tmp_path)
    odd = tmp_path / ".odd name é.yaml"
    odd.write_text(TINY_MOCO)
    jobs = build_jobs([files[0], str(odd)], [0], {}, parse_assignments(
        ["data_dir=['../../escape', '/etc', 'a b/é', '..']"], "--vary"), tmp_path / "out")
    assert len({job.folder for job in jobs}) == 8
    for job in jobs:
        assert job.folder.parent.parent == tmp_path / "out" and job.folder.resolve().is_relative_to(tmp_path / "out")
        assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", job.group), job.group
    from functions.train.sweep_jobs import group_name

    assert len(group_name("p", {"milestones": list(range(200))})) <= 100
    with pytest.raises(UserError, match="unknown option '../x'"):
        build_jobs(files[:1], [0], parse_assignments(["../x=1"], "--set"), {}, tmp_path / "out")


def test_sweep_files_that_cannot_be_written_or_read_are_one_line(tmp_path: Path) -> None:
    files = presets(tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot make the folder"):
        main(summarise_command(files[0], tmp_path / "a_file" / "sweep"))
    output_dir = tmp_path / "sweep"
    [job] = build_jobs(files[:1], [0], {}, {}, output_dir)
    finish_fake_run(job)
    (output_dir / "results.md").mkdir()
    with pytest.raises(UserError, match="cannot write .*results.md"):
        main(summarise_command(files[0], output_dir))
    (output_dir / "results.md").rmdir()
    (job.folder / "sweep_config.yaml").write_text("lr: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UserError, match=r"sweep_config.yaml is not a sweep config the sweep wrote"):
        main(summarise_command(files[0], output_dir))
    assert not list(output_dir.glob(".results.md.*"))  # no temporary file left behind
