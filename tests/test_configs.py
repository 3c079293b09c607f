"""Options: presets parse, YAML values sit under the command line, contradictions are one clear line."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
    import torch

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
