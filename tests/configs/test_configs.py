"""Options: presets parse, YAML values sit under the command line, contradictions are one clear line."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from entry_runs import FAST, SUBPROCESS_TIMEOUT_S, assert_clean_user_error, cli_error, entry_env, run_entry
from paths import REPO_ROOT
from sfl_helpers import TINY_SWAV

import run_sflmoco
import run_sflswav
from configs import CONFIG_DIR, parse_args, run_options, save_resolved_config
from functions.core.errors import UserError


def _method(preset: Path) -> str:
    return "swav" if preset.name.startswith("swav") else "moco"


@pytest.mark.parametrize("preset", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_parses_with_its_entry(preset):
    args = parse_args(_method(preset), ["--config", str(preset)])
    for key, value in yaml.safe_load(preset.read_text()).items():
        assert getattr(args, key) == value, key


def test_command_line_overrides_the_config_file(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 0.3\nnum_client: 7\n")
    args = parse_args("moco", ["--config", str(preset), "--lr", "0.01"])
    assert args.lr == 0.01 and args.num_client == 7 and args.c_lr == 0.01


def test_unknown_config_key_is_refused(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("learning_rate: 0.3\n")
    with pytest.raises(UserError, match="unknown option 'learning_rate'"):
        parse_args("moco", ["--config", str(preset)])


def test_resolved_config_round_trips(tmp_path):
    args = parse_args("swav", ["--num_client", "4", "--nmb_crops", "2", "--size_crops", "32",
                               "--min_scale_crops", "0.2", "--max_scale_crops", "1", "--crops_for_assign", "0", "1"])
    save_resolved_config(args, tmp_path / "config.yaml")
    again = parse_args("swav", ["--config", str(tmp_path / "config.yaml")])
    assert {**run_options(again), "config": None} == run_options(args)


@pytest.mark.parametrize("argv, message", [
    (["--cutlayer", "10"], "--cutlayer 10 is past ResNet18"),
    (["--arch", "ResNet99"], "ResNet99"),
    (["--client_sample_ratio", "0"], "--client_sample_ratio"),
    (["--hetero", "--hetero_string", "half"], "--hetero_string"),
    (["--eval_only"], "--checkpoint"),
])
def test_contradictions_are_one_clear_line(argv, message):
    with pytest.raises(UserError, match=message) as error:
        parse_args("moco", argv)
    assert "\n" not in str(error.value)


def test_device_defaults_to_cpu_without_cuda():

    from functions.core.distributed import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda")


PAPER_PRESETS = sorted([*CONFIG_DIR.glob("mocosfl_*.yaml"), *CONFIG_DIR.glob("seed_*.yaml"),
                        CONFIG_DIR / "swav_seed.yaml"])


@pytest.mark.parametrize("preset", PAPER_PRESETS, ids=lambda p: p.name)
def test_every_paper_preset_names_the_figure_it_should_reach(preset):
    import re

    comments = " ".join(line for line in preset.read_text().splitlines() if line.startswith("#"))
    assert re.search(r"\d+\.\d+ %", comments), f"{preset.name} has no reported figure in its comments"


@pytest.mark.parametrize("preset", sorted(CONFIG_DIR.glob("mocosfl_table*_*clients.yaml")), ids=lambda p: p.name)
def test_mocosfl_presets_match_its_auto_adjust(preset):
    # MocoSFL's scripts run these with --auto_adjust (or, for 20 clients, its explicit values); the preset must
    # give the same batch size, FedAvg frequency and client sampling.
    args = parse_args("moco", ["--config", str(preset)])
    if args.scheme == "fl":
        return
    adjusted = parse_args("moco", ["--num_client", str(args.num_client), "--auto_adjust"])
    if args.num_client == 20:  # scripts/table2 sets these for 20 clients
        assert (args.batch_size, args.client_sample_ratio, args.avg_freq) == (20, 0.25, 10)
    else:
        assert (args.batch_size, args.client_sample_ratio, args.avg_freq) == (
            adjusted.batch_size, adjusted.client_sample_ratio, adjusted.avg_freq)
    assert (args.moco_version, args.lr, args.num_epoch, args.noniid_ratio) == ("V2", 0.06, 200, 0.2)


def test_unknown_config_key_exits_2_without_traceback(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("num_client: 3\nlearning_rate: 0.1\n")
    result = run_entry("run_sflswav.py", ["--config", str(preset), "--output_dir", str(tmp_path / "run")])
    assert_clean_user_error(result, "unknown option 'learning_rate'", str(preset))


@pytest.mark.parametrize("main, argv, message", [
    (run_sflswav.main, [*TINY_SWAV, "--nmb_crops", "2", "6", "--size_crops", "32"],
     "the crop lists must have the same length"),
    (run_sflswav.main, [*TINY_SWAV, "--nmb_crops", "2", "--size_crops", "32", "--min_scale_crops", "0.2",
                        "--max_scale_crops", "1", "--crops_for_assign", "0", "2"],
     "--crops_for_assign 2 is out of range: there are 2 crops"),
    (run_sflmoco.main, [*FAST, "--cutlayer", "10"], "--cutlayer 10 is past ResNet18"),
    (run_sflmoco.main, [*FAST, "--num_client", "600"], "cannot split 512 samples across 600 clients"),
    (run_sflmoco.main, [*FAST, "--scheme", "fl", "--initialze_path", "no_such_run"],
     "--scheme fl trains whole networks on the clients and would ignore it"),
    (run_sflmoco.main, [*FAST, "--scheme", "fl", "--initialze_path", "no_such_run", "--load_server"],
     "--scheme fl trains whole networks on the clients and would ignore it"),
    (run_sflmoco.main, [*FAST, "--scheme", "fl", "--attack"], "--scheme fl sends none"),
])
def test_option_contradictions_exit_2_with_one_line(tmp_path, capsys, main, argv, message):
    code, line = cli_error(main, [*argv, "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 2 and message in line


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
    ("moco", ["--width", "100000"], "--width must be in [1, 1024] (got 100000)"),
    ("moco", ["--K", "100000000"], "--K must be in [1, 1048576]"),
    ("moco", ["--K_dim", "1000000"], "--K_dim must be in [1, 65536]"),
    ("swav", ["--hidden_mlp", "10000000"], "--hidden_mlp must be in [0, 65536]"),
    ("swav", ["--feat_dim", "10000000"], "--feat_dim must be in [1, 65536]"),
    ("swav", ["--nmb_prototypes", "10000000"], "--nmb_prototypes must be in [2, 65536]"),
    ("swav", ["--queue_length", "100000000"], "--queue_length must be in [0, 1048576]"),
    ("moco", ["--num_client", "100001"], "--num_client must be in [1, 100000] (got 100001)"),
    # --auto_adjust divides by both: the range is checked first.
    ("moco", ["--auto_adjust", "--num_client", "0"], "--num_client must be in [1, 100000] (got 0)"),
    ("moco", ["--auto_adjust", "--batch_size", "0"], "--batch_size must be in [1, inf) (got 0)"),
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


def test_an_unknown_option_is_one_line_not_argparse_usage(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "run_sflswav.py"), "--nmb_cropz", "2"], cwd=REPO_ROOT,
                            env=entry_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert_clean_user_error(result, "unrecognized arguments: --nmb_cropz 2", "run_sflswav.py --help")
    assert "usage:" not in result.stderr


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_output_dir_is_refused(value, capsys):
    code, line = cli_error(run_sflmoco.main, [*FAST, "--output_dir", value], capsys)
    assert code == 2 and "--output_dir is empty" in line


def root_like_folders(tmp_path: Path) -> dict[str, str]:
    """Spellings of the file system's root and of the home folder (HOME is tmp_path/home) that a run refuses."""
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    (tmp_path / "to_root").symlink_to("/")
    (tmp_path / "to_home").symlink_to(home)
    return {"root": "/", "root through ..": "/tmp/..", "root through a link": str(tmp_path / "to_root"),
            "home": str(home), "home with ~": "~", "home with ~/": "~/", "home through ..": str(home / "sub" / ".."),
            "home through a link": str(tmp_path / "to_home")}


ROOT_LIKE = ["root", "root through ..", "root through a link", "home", "home with ~", "home with ~/",
             "home through ..", "home through a link"]


@pytest.mark.parametrize("name", ROOT_LIKE)
def test_a_root_like_output_dir_is_refused(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = root_like_folders(tmp_path)[name]
    kind = "the file system's root" if name.startswith("root") else "your home folder"
    with pytest.raises(UserError, match=f"^--output_dir {re.escape(folder)} is {kind}: the run would spread"):
        parse_args("moco", [*FAST, "--output_dir", folder])


def test_a_folder_inside_home_or_beside_the_root_is_a_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root_like_folders(tmp_path)
    for folder in ("~/runs/a", str(tmp_path / "home" / "sub"), str(tmp_path / "to_home" / "sub"), "/tmp"):
        assert parse_args("moco", [*FAST, "--output_dir", folder]).output_dir == folder


@pytest.mark.parametrize("option, value, interval", [
    ("--ressfl_alpha", "-1", "[0, inf)"), ("--ressfl_alpha", "nan", "[0, inf)"), ("--ressfl_alpha", "inf", "[0, inf)"),
    ("--ressfl_target_ssim", "2", "[-1, 1]"), ("--ressfl_target_ssim", "-5", "[-1, 1]"),
    ("--ressfl_target_ssim", "nan", "[-1, 1]"), ("--div_lambda", "-1", "(0, inf)"), ("--div_lambda", "nan", "(0, inf)"),
    ("--div_lambda", "0", "(0, inf)"), ("--loss_threshold", "-1", "[0, inf)"), ("--loss_threshold", "nan", "[0, inf)"),
    ("--local_epoch", "0", "[1, inf)"), ("--local_epoch", "-1", "[1, inf)"),
])
def test_privacy_fedavg_and_communication_options_outside_their_range_are_refused(option, value, interval, capsys):
    code, line = cli_error(run_sflmoco.main, [*FAST, option, value], capsys)
    assert code == 2 and f"{option} must be in {interval}" in line
