"""Expert initialisation: MocoSFL's published client parts through the key mapping, and parts of an earlier run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from paths import FIXTURES, SHARED
from sfl_helpers import TINY_MOCO, run_moco_with_bottleneck

from configs import parse_args
from functions.core.checkpoint import CHECKPOINT_NAME, load_checkpoint
from functions.core.errors import UserError
from functions.core.options import typed_options
from functions.methods.registry import method_class
from functions.privacy.expert import (
    MOCOSFL_CLIENT_FILE,
    InitialWeightsOptions,
    load_initial_weights,
    mocosfl_client_state,
)
from models.split import build_split_model

EXPERTS = SHARED / "mocosfl-expert"


def _expert_folder(cutlayer: int) -> Path:
    folders = sorted(EXPERTS.glob(f"*_cut{cutlayer}_*"))
    if not folders or not (folders[0] / MOCOSFL_CLIENT_FILE).is_file():
        pytest.skip(f"MocoSFL's expert client parts not found in {EXPERTS}")
    return folders[0]


def _mocosfl_forward(state: dict[str, torch.Tensor], cutlayer: int, images: torch.Tensor) -> torch.Tensor:
    """MocoSFL's client part (ResNet-18 with GroupNorm and its weight standardisation, then the C4S2 bottleneck),
    written out layer by layer from its state dict: the reference the mapped model must reproduce."""
    def ws_conv(x, weight, stride=1):
        centred = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
        standardised = centred / (centred.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
        return F.conv2d(x, standardised, stride=stride, padding=1)

    def norm(x, prefix):
        return F.group_norm(x, x.shape[1] // 4, state[f"{prefix}.weight"], state[f"{prefix}.bias"])

    x = F.relu(norm(ws_conv(images, state["0.conv1.weight"]), "0.bn1"))
    for block in range(1, cutlayer):
        out = F.relu(norm(ws_conv(x, state[f"{block}.conv1.weight"]), f"{block}.bn1"))
        x = F.relu(norm(ws_conv(out, state[f"{block}.conv2.weight"]), f"{block}.bn2") + x)
    return F.relu(F.conv2d(x, state[f"{cutlayer}.weight"], state[f"{cutlayer}.bias"], stride=2, padding=1))


@pytest.mark.parametrize("cutlayer", [1, 2, 3])
def test_mocosfl_expert_client_parts_load_through_the_key_mapping(cutlayer) -> None:
    folder = _expert_folder(cutlayer)
    published = torch.load(folder / MOCOSFL_CLIENT_FILE, map_location="cpu", weights_only=True)
    split = build_split_model("ResNet18", cutlayer, bottleneck="C4S2")
    mapped = mocosfl_client_state(published, "ResNet18", cutlayer)
    own = split.client.state_dict()
    assert mapped.keys() == own.keys()
    assert all(mapped[key].shape == own[key].shape for key in own)
    load_initial_weights(InitialWeightsOptions(initialze_path=str(folder), arch="ResNet18", cutlayer=cutlayer,
                                               load_server=False), split)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(cutlayer))
    with torch.no_grad():
        expected, actual = _mocosfl_forward(published, cutlayer, images), split.client(images)
    assert torch.allclose(actual, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


def test_an_expert_of_another_cut_is_refused_with_what_it_holds() -> None:
    folder = _expert_folder(1)
    split = build_split_model("ResNet18", 2, width=64, bottleneck="C4S2")
    options = InitialWeightsOptions(initialze_path=str(folder), arch="ResNet18", cutlayer=2, load_server=False)
    with pytest.raises(UserError, match="client part at --cutlayer 1 and a bottleneck of 4 channels"):
        load_initial_weights(options, split)


def test_a_run_starts_from_an_earlier_runs_clients_and_server(tmp_path) -> None:
    expert = run_moco_with_bottleneck(tmp_path, "expert", "--max_steps", "2", "--seed", "11")
    saved = load_checkpoint(expert / CHECKPOINT_NAME)
    args = parse_args("moco", [*TINY_MOCO, "--num_client", "2", "--bottleneck_option", "C4S2",
                               "--initialze_path", str(expert), "--load_server"])
    split = build_split_model("ResNet18", 1, width=8, bottleneck="C4S2", head=method_class("moco").head_builder(args))
    load_initial_weights(typed_options(InitialWeightsOptions, args), split)
    models = saved["clients"]["models"]
    for key, value in split.client.state_dict().items():
        assert torch.allclose(value, (models[0][key] + models[1][key]) / 2), key
    for key, value in split.server.state_dict().items():
        assert torch.equal(value, saved["method"][f"server.{key}"]), key
    other_cut = parse_args("moco", [*TINY_MOCO, "--cutlayer", "2", "--initialze_path", str(expert)])
    with pytest.raises(UserError, match="that run used --arch ResNet18 --cutlayer 1 --bottleneck_option C4S2"):
        load_initial_weights(typed_options(InitialWeightsOptions, other_cut), build_split_model("ResNet18", 2, width=8))


@pytest.mark.parametrize("edit, fragment", [
    ("missing_keys", "is incomplete (no "),
    ("no_clients", "clients holds no client models"),
    ("nan", "holds non-finite weights"),
])
def test_an_earlier_run_of_a_broken_layout_is_one_line(tmp_path, edit, fragment) -> None:
    state = load_checkpoint(FIXTURES / "checkpoint_format1_swav.pt")
    if edit == "missing_keys":
        state = {"format": state["format"], "args": state["args"]}
    elif edit == "no_clients":
        state["clients"]["models"] = []
    else:
        model = state["clients"]["models"][0]
        model[next(iter(model))].fill_(float("nan"))
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    args = parse_args("moco", [*TINY_MOCO, "--initialze_path", str(tmp_path)])
    with pytest.raises(UserError, match="--initialze_path") as refused:
        load_initial_weights(typed_options(InitialWeightsOptions, args), build_split_model("ResNet18", 1, width=8))
    assert str(tmp_path / CHECKPOINT_NAME) in str(refused.value) and fragment in str(refused.value)
