"""The ResNet-18 client against MocoSFL's own (tests/fixtures/mocosfl/resnet_stem.*, written by
benchmarks/golden/resnet_stem.py): smashed-data shapes at cuts 1-3 for 32, 64, 96 and 224-pixel images, and the
client's output with MocoSFL's weights copied in."""
from __future__ import annotations

import re

import pytest
import torch
from mocosfl_fixtures import load_fixture

from models.split import build_split_model, unit_names

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = (32, 64, 96, 224)
CUTS = (1, 2, 3)
# float32 convolutions and GroupNorm summed in another order; the only modelled difference is MocoSFL's
# weight standardisation dividing by the unbiased std, which the GroupNorm after every convolution cancels up to
# its eps (measured: at most 3.6e-6 on outputs up to 8.5).
TOLERANCE = 1e-5


def ours_from_mocosfl(key: str) -> str:
    """This project's client key of a key of MocoSFL's client Sequential (0 = stem, k = the k-th block)."""
    index, rest = key.split(".", 1)
    unit = unit_names("ResNet18")[int(index)]
    if unit == "stem":
        return "stem." + rest.replace("conv1", "conv").replace("bn1", "norm")
    return f"{unit}." + re.sub(r"^bn(\d)", r"norm\1", rest)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cut", CUTS)
def test_smashed_data_shapes_are_mocosfls(size: int, cut: int) -> None:
    values, _ = load_fixture("resnet_stem")
    client = build_split_model("ResNet18", cut, width=64, image_size=size).client
    with torch.no_grad():
        shape = list(client(torch.zeros(1, 3, size, size)).shape)
    assert shape == values["smashed_shapes"][f"{size}_cut{cut}"]


@pytest.mark.parametrize("size", SIZES)
def test_client_outputs_with_mocosfls_weights(size: int) -> None:
    values, tensors = load_fixture("resnet_stem", with_tensors=True)
    weights = {ours_from_mocosfl(key): value for key, value in tensors[f"weights_{size}"].items()}
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(values["input_seed"] + size))
    step = values["subsample"]
    for cut in CUTS:
        client = build_split_model("ResNet18", cut, width=values["tiny_width"], image_size=size).client.eval()
        client.load_state_dict({key: value for key, value in weights.items() if key in client.state_dict()},
                               strict=True)
        with torch.no_grad():
            output = client(image)
        if f"output_{size}_cut{cut}" in tensors:
            torch.testing.assert_close(output, tensors[f"output_{size}_cut{cut}"], atol=TOLERANCE, rtol=TOLERANCE)
            continue
        torch.testing.assert_close(output.mean(dim=(2, 3)), tensors[f"output_{size}_cut{cut}_mean"],
                                   atol=TOLERANCE, rtol=TOLERANCE)
        torch.testing.assert_close(output.square().mean(dim=(2, 3)), tensors[f"output_{size}_cut{cut}_square_mean"],
                                   atol=TOLERANCE, rtol=TOLERANCE)
        torch.testing.assert_close(output[:, :, ::step, ::step], tensors[f"output_{size}_cut{cut}_subsample"],
                                   atol=TOLERANCE, rtol=TOLERANCE)
