"""The bottleneck at the cut (MocoSFL's --bottleneck_option): its codes, shapes and state-dict split."""
from __future__ import annotations

import pytest
import torch
from split_states import merge_split, merge_state_dicts, split_state_dict

from configs import parse_args
from functions.core.errors import UserError
from models.bottleneck import parse_bottleneck_option
from models.split import build_split_model


@pytest.mark.parametrize("option, channels, stride, kernel, relu", [
    ("C4S2", 4, 2, 3, True), ("C8S1", 8, 1, 3, True), ("K5C8S1", 8, 1, 5, True), ("noRELUC4S4", 4, 4, 3, False),
    ("C16", 16, 1, 3, True)])
def test_bottleneck_codes_parse_as_in_mocosfl(option, channels, stride, kernel, relu) -> None:
    spec = parse_bottleneck_option(option)
    assert (spec.channels, spec.stride, spec.kernel, spec.relu) == (channels, stride, kernel, relu)


@pytest.mark.parametrize("option", ["C4S3", "4S2", "C0S2", "K4C8S1", "K5C4S2", "bottleneck"])
def test_a_bad_bottleneck_code_is_one_clear_error(option) -> None:
    with pytest.raises(UserError, match="--bottleneck_option"):
        parse_bottleneck_option(option)


@pytest.mark.parametrize("cutlayer, option, shape", [(1, "C4S2", (4, 16, 16)), (2, "C8S1", (8, 32, 32)),
                                                     (3, "C2S4", (2, 8, 8))])
def test_the_bottleneck_sets_what_the_client_sends_and_the_server_restores_the_cut(cutlayer, option, shape) -> None:
    torch.manual_seed(0)
    plain = build_split_model("ResNet18", cutlayer, width=8)
    torch.manual_seed(0)
    squeezed = build_split_model("ResNet18", cutlayer, width=8, bottleneck=option)
    images = torch.rand(2, 3, 32, 32)
    smashed = squeezed.client(images)
    assert tuple(smashed.shape[1:]) == shape
    assert squeezed.server.backbone.server_bottleneck(smashed).shape == plain.client(images).shape
    assert squeezed.server(smashed).shape == plain.server(plain.client(images)).shape
    # The other weights are those of the model without a bottleneck (its layers are drawn last).
    plain_state = merge_split(plain).state_dict()
    for key, value in merge_split(squeezed).state_dict().items():
        if "bottleneck" not in key:
            assert torch.equal(value, plain_state[key]), key


def test_state_dicts_split_and_merge_with_the_bottleneck_on_its_side() -> None:
    split = build_split_model("ResNet18", 2, width=8, bottleneck="C4S2")
    whole = merge_split(split).state_dict()
    client_state, server_state = split_state_dict(whole, "ResNet18", 2)
    assert client_state.keys() == split.client.state_dict().keys()
    assert any(key.startswith("client_bottleneck.") for key in client_state)
    assert any(key.startswith("backbone.server_bottleneck.") for key in server_state)
    assert merge_state_dicts(client_state, server_state).keys() == whole.keys()


def test_a_stride_that_does_not_divide_the_grid_is_refused() -> None:
    with pytest.raises(UserError, match="does not divide"):
        build_split_model("ResNet18", 1, width=8, bottleneck="C4S4", image_size=30)


def test_a_bottleneck_option_alone_adds_the_bottleneck_as_in_mocosfl() -> None:
    assert parse_args("moco", ["--bottleneck_option", "C4S2"]).adds_bottleneck
