"""The client cost calculator: bytes of smashed data and gradients, client FLOPs and memory, per run and alone."""
from __future__ import annotations

import json

import pytest
from mocosfl_fixtures import load_fixture
from sfl_helpers import moco_trainer

from functions.sfl.overhead import BYTES_PER_VALUE, MOCOSFL_FLOP_UNIT, main

SMASHED_VALUES_CUT_1 = 64 * 32 * 32          # ResNet-18's stem output for one 32x32 image
STEM_CONV_FLOPS = 2 * 3 * 64 * 9 * 32 * 32   # multiply and add of the 3x3 convolution, 3 -> 64 channels


def test_cut_1_costs_match_the_stem_written_out():
    cut_1, cut_2 = main(["--cutlayer", "1", "2", "--batch_size", "1", "--no-symmetric"])
    # MoCo: the view through the client's model goes up and its gradient comes down; the momentum copy's view
    # goes up only.
    assert cut_1["smashed_up_bytes"] == 2 * SMASHED_VALUES_CUT_1 * BYTES_PER_VALUE
    assert cut_1["gradient_down_bytes"] == SMASHED_VALUES_CUT_1 * BYTES_PER_VALUE
    # Forward of each view, and the weight gradient of the first layer (no gradient for the images).
    assert cut_1["client_flops_per_step"] == 3 * STEM_CONV_FLOPS
    assert cut_1["client_parameters"] == 3 * 64 * 9 + 2 * 64
    assert cut_1["client_memory_bytes"] > 3 * cut_1["client_parameters"] * BYTES_PER_VALUE
    assert cut_1["fedavg_round_bytes"] == 2 * cut_1["client_parameters"] * BYTES_PER_VALUE
    # Cut 2 adds a residual block at the same resolution: the same smashed size, far more work.
    assert cut_2["smashed_up_bytes"] == cut_1["smashed_up_bytes"]
    assert cut_2["client_flops_per_step"] > 30 * cut_1["client_flops_per_step"]


def test_costs_grow_with_the_batch_and_fl_sends_no_smashed_data():
    one, = main(["--cutlayer", "2", "--batch_size", "1"])
    eight, = main(["--cutlayer", "2", "--batch_size", "8"])
    for key in ("smashed_up_bytes", "gradient_down_bytes", "client_flops_per_step"):
        assert eight[key] == 8 * one[key]
    fl, = main(["--scheme", "fl", "--batch_size", "2"])
    assert fl["smashed_up_bytes"] == fl["gradient_down_bytes"] == 0
    assert fl["client_parameters"] > 100 * one["client_parameters"]


def test_a_run_logs_its_costs_and_keeps_them_in_metrics(tmp_path):
    trainer = moco_trainer(tmp_path, "--num_client", "2", "--cutlayer", "1", "--batch_size", "4")
    trainer.log.metrics.save()
    saved = json.loads((tmp_path / "metrics.json").read_text())["overhead"]
    assert saved["cutlayer"] == 1 and saved["batch_size"] == 4
    assert saved["smashed_up_bytes"] == 4 * 2 * 8 * 32 * 32 * BYTES_PER_VALUE  # --width 8: 8 channels


@pytest.mark.parametrize("method", ["moco", "swav"])
def test_the_calculator_runs_alone_for_both_methods(method, capsys):
    records = main(["--method", method, "--cutlayer", "1", "2"])
    printed = capsys.readouterr().out
    assert [record["cutlayer"] for record in records] == [1, 2]
    assert printed.count("client cost per step") == 2
    for record in records:  # both conventions printed, each under its name
        assert f"{record['client_flops_per_step'] / 1e6:.1f} MFLOPs" in printed
        mocosfl_figure = record["mocosfl_flops_per_image"] / MOCOSFL_FLOP_UNIT
        assert f"MocoSFL-convention FLOPs/image {mocosfl_figure:.2f} M" in printed


@pytest.mark.parametrize("dataset, image_size, cuts", [("cifar10", 32, (1, 2, 3)), ("tinyimagenet", 64, (1, 2, 3)),
                                                        ("imagenet12", 224, (1,))])
def test_mocosfl_convention_flops_are_those_mocosfls_calculator_prints(dataset, image_size, cuts, capsys):
    values, _ = load_fixture("overhead")
    expected = {record["cut"]: record for record in values["records"] if record["image_size"] == image_size}
    records = main(["--dataset", dataset, "--cutlayer", *map(str, cuts), "--batch_size", "1"])
    printed = capsys.readouterr().out
    for record in records:
        mocosfl = expected[record["cutlayer"]]
        # fvcore's integer count exactly; the printed "FLOPs/image" (2 decimals of 2^20) as MocoSFL prints it.
        assert record["mocosfl_flops_per_image"] == 3 * mocosfl["fvcore_forward_total"]
        assert f"FLOPs/image {mocosfl['printed_flops_per_image_M']:.2f} M" in printed
    if image_size == 32:  # this project's own count stays beside it: 1.7-2.8x MocoSFL's figure
        assert [round(r["client_flops_per_step"] / 1e6, 1) for r in records] == [10.6, 614.6, 1218.6]
