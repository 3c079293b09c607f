"""This project's privacy parts against MocoSFL's own code (fixture tests/fixtures/mocosfl/privacy.*, written by
benchmarks/golden/privacy.py): SSIM, one ResSFL step, the attack decoders, the initialisation, the experts."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from paths import MOCOSFL_FIXTURES, SHARED
from torch import nn

from functions.privacy.expert import (
    MOCOSFL_CLIENT_FILE,
    InitialWeightsOptions,
    load_initial_weights,
    mocosfl_client_state,
)
from functions.privacy.image_quality import ssim, ssim_per_image
from functions.privacy.ressfl import SimulatedAttacker
from models.decoders import inversion_decoder
from models.split import build_split_model

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = MOCOSFL_FIXTURES / "privacy"
EXPERTS = SHARED / "mocosfl-expert"
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # MocoSFL's denormalize


@pytest.fixture(scope="module")
def golden() -> tuple[dict, dict]:
    if not FIXTURE.with_suffix(".json").is_file():
        pytest.skip("fixture tests/fixtures/mocosfl/privacy.json absent (python benchmarks/golden/privacy.py)")
    return (json.loads(FIXTURE.with_suffix(".json").read_text()),
            torch.load(FIXTURE.with_suffix(".pt"), map_location="cpu", weights_only=True))


def _checksums(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().double().flatten()
    return [float(flat.sum()), float((flat * flat).sum()), *[float(v) for v in flat[:4]]]


def _decoder_key(mocosfl_key: str) -> str:
    """A MocoSFL decoder key (m.<index>.<name>, its blocks' bn0 / bn1) in this project's naming."""
    return mocosfl_key.removeprefix("m.").replace(".bn0.", ".norm0.").replace(".bn1.", ".norm1.")


# ----------------------------------------------------------------------------------------------------------- SSIM
def test_ssim_is_mocosfls_pytorch_ssim(golden) -> None:
    values, tensors = golden
    originals, reconstructed = tensors["ssim_originals"].float() / 255, tensors["ssim_reconstructed"].float() / 255
    # The same float32 operations in the same order: measured equal (difference 0); 1e-6 allows another BLAS.
    assert ssim_per_image(reconstructed, originals).tolist() == pytest.approx(values["ssim"]["per_pair"], abs=1e-6)
    assert float(ssim(reconstructed, originals)) == pytest.approx(values["ssim"]["batch"], abs=1e-6)


def test_torchmetrics_ssim_is_another_convention(golden) -> None:
    from torchmetrics.functional.image import structural_similarity_index_measure

    values, tensors = golden
    originals, reconstructed = tensors["ssim_originals"].float() / 255, tensors["ssim_reconstructed"].float() / 255
    other = structural_similarity_index_measure(reconstructed, originals, data_range=1.0, reduction="none")
    # Reflection padding and a cropped border: values differ by far more than float error.
    assert max(abs(a - b) for a, b in zip(other.tolist(), values["ssim"]["per_pair"])) > 0.01


# --------------------------------------------------------------------------------------------------------- ResSFL
@pytest.mark.parametrize("target, batch_size", [(0.0, 4), (0.01, 4), (0.5, 4), (0.0, 32)])
def test_one_ressfl_step_is_mocosfls(golden, target: float, batch_size: int) -> None:
    values, tensors = golden
    images = tensors["ressfl_images"].float() / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    # MocoSFL drew its simulated attacker after torch.manual_seed(4): the same seed here draws the same decoder
    # (batch 4: GroupNorm and standardised convolutions; batch 32: BatchNorm, Xavier on the plain convolutions).
    args = argparse.Namespace(ressfl_alpha=2.0, ressfl_target_ssim=target, MIA_arch="conv_normN0C8", seed=4,
                              client_sample_ratio=1.0, batch_size=batch_size)
    client = nn.Conv2d(3, 4, 3, stride=2, padding=1)  # only its output shape (4 x 16 x 16) matters here
    attacker = SimulatedAttacker(args, client, 32, CIFAR10_MEAN, CIFAR10_STD, torch.device("cpu"))
    drawn, reference_state = attacker.decoder.state_dict(), tensors[f"ressfl_decoder_batch_{batch_size}"]
    assert sorted(drawn) == sorted(_decoder_key(k) for k in reference_state)
    for key, value in reference_state.items():
        assert torch.equal(drawn[_decoder_key(key)], value), key
    gradient, stats = attacker(tensors["ressfl_smashed"].clone(), (images - mean) / std, [2], epoch=0)
    expected = values["ressfl"][f"target_{target}_batch_{batch_size}"]
    assert float(stats["ressfl_attacker_ssim"]) == pytest.approx(expected["train_ssim"], abs=1e-6)
    assert float(stats["ressfl_client_ssim"]) == pytest.approx(expected["client_ssim"], abs=1e-6)
    if not expected["gradient"]:  # the attacker is below the target: MocoSFL adds nothing, here a zero gradient
        assert torch.count_nonzero(gradient) == 0
        return
    reference = tensors[f"ressfl_gradient_target_{target}_batch_{batch_size}"]
    # One Adam step from the same decoder: equal up to float32 summation order (measured 4e-9 on values up to
    # 1.1e-3, so 2.5e-7 is 60x the measured difference).
    assert torch.allclose(gradient, reference, rtol=1e-4, atol=2.5e-7)


# ------------------------------------------------------------------------------------------------------- decoders
def _decoder_cases() -> list[str]:
    """The decoder cases of the fixture (none without it: the golden fixture then skips the rest)."""
    if not FIXTURE.with_suffix(".json").is_file():
        return []
    return list(json.loads(FIXTURE.with_suffix(".json").read_text())["decoders"])


@pytest.mark.parametrize("key", _decoder_cases())
def test_decoders_are_mocosfls_layer_for_layer(golden, key: str) -> None:
    values, tensors = golden
    case, stored = values["decoders"][key], tensors[f"decoder_{key}"]
    torch.manual_seed(case["seed"])
    decoder = inversion_decoder(case["name"], case["in_channels"], case["in_size"], 32, group_norm=case["group_norm"])
    assert sum(parameter.numel() for parameter in decoder.parameters()) == case["parameters"]
    assert sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in decoder.modules()) == case["convolutions"]
    # Same layers built in the same order: the same seed draws MocoSFL's weights exactly.
    own = decoder.state_dict()
    assert sorted(own) == sorted(_decoder_key(k) for k in case["checksums"])
    for mocosfl_key, sums in case["checksums"].items():
        assert _checksums(own[_decoder_key(mocosfl_key)]) == pytest.approx(sums, rel=1e-12, abs=1e-12), mocosfl_key
    if "state" in stored:
        decoder.load_state_dict({_decoder_key(k): v for k, v in stored["state"].items()})
    generator = torch.Generator().manual_seed(100 + case["seed"])
    inputs = torch.relu(torch.randn(4, case["in_channels"], case["in_size"], case["in_size"], generator=generator))
    assert _checksums(inputs) == pytest.approx(stored["inputs_checksum"], rel=1e-12)
    for mode in ("train", "eval"):
        decoder.train(mode == "train")
        with torch.no_grad():
            output = decoder(inputs)
        # Sigmoid outputs in (0, 1) from the same weights: measured equal with BatchNorm, within 3e-7 with the
        # GroupNorm variant (summation order of the standardisation); 1e-5 is 30x that.
        assert torch.allclose(output[..., :8, :8], stored[f"{mode}_output"], atol=1e-5), mode
        assert _checksums(output)[:2] == pytest.approx(case["output_checksums"][mode][:2], rel=1e-5), mode


# ------------------------------------------------------------------------------------------------ initialisation
def test_a_seeded_resnet18_client_draws_mocosfls_weights(golden) -> None:
    values, _ = golden
    init = values["init"]
    torch.manual_seed(init["seed"])
    split = build_split_model("ResNet18", init["cutlayer"], width=64, bottleneck=init["bottleneck"])
    names = mocosfl_client_state({key: torch.zeros(()) for key in init["checksums"]}, "ResNet18", init["cutlayer"])
    own = split.client.state_dict()
    for (mocosfl_key, sums), key in zip(init["checksums"].items(), names):
        assert _checksums(own[key]) == pytest.approx(sums, rel=1e-12, abs=1e-12), key


# ------------------------------------------------------------------------------------------------------- experts
@pytest.mark.parametrize("cutlayer", [1, 2, 3])
def test_expert_client_parts_compute_what_mocosfls_do(golden, cutlayer: int) -> None:
    values, tensors = golden
    folder = EXPERTS / values["experts"][f"cut{cutlayer}"]
    if not (folder / MOCOSFL_CLIENT_FILE).is_file():
        pytest.skip(f"MocoSFL's expert client parts not found in {EXPERTS}")
    split = build_split_model("ResNet18", cutlayer, width=64, bottleneck="C4S2")
    load_initial_weights(InitialWeightsOptions(initialze_path=str(folder), arch="ResNet18", cutlayer=cutlayer,
                                               load_server=False), split)
    split.client.eval()
    with torch.no_grad():
        output = split.client(tensors["expert_images"].float() / 255)
    expected = tensors[f"expert_output_cut{cutlayer}"]
    scale = float(expected.abs().max())
    # MocoSFL standardises kernels with the unbiased std, this project with the biased one; GroupNorm removes the
    # common factor, so only float32 rounding remains: measured 2.5e-7 of the largest value (cut 1: 1.8e-4 on
    # values up to 723), so 1e-5 of it is 40x the measured difference.
    assert torch.allclose(output, expected, rtol=1e-5, atol=1e-5 * scale)


# -------------------------------------------------------------------------------------------- the attack protocol
def test_mocosfls_attack_loop_keeps_the_best_validation_batch_and_scores_image_by_image(golden) -> None:
    from functions.privacy.attack_mocosfl import attack_figures, train_decoder

    protocol = golden[0]["protocol"]
    small = torch.rand(17, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    images = torch.nn.functional.interpolate(small, size=32, mode="bilinear", align_corners=False)
    images = images.mul(255).round().div(255)
    smashed = torch.relu(torch.randn(17, 4, 16, 16, generator=torch.Generator().manual_seed(7)))
    assert _checksums(images) == pytest.approx(protocol["pairs_checksums"]["images"], rel=1e-12)
    assert _checksums(smashed) == pytest.approx(protocol["pairs_checksums"]["smashed"], rel=1e-12)
    torch.manual_seed(protocol["decoder_seed"])
    decoder = inversion_decoder("conv_normN0C8", 4, 16, 32)
    batches = ([torch.tensor(rows) for rows in protocol["train_batches"]],
               [torch.tensor(rows) for rows in protocol["validation_batches"]])
    kept, best_loss = train_decoder(decoder, smashed, images, protocol["epochs"], lambda epoch: batches)
    # Same weights, batches and Adam steps: float32 rounding only (measured below 1e-7).
    assert best_loss == pytest.approx(protocol["best_validation_loss"], abs=1e-6)
    for mocosfl_key, sums in protocol["kept_checksums"].items():
        assert _checksums(kept[_decoder_key(mocosfl_key)])[:2] == pytest.approx(sums[:2], rel=1e-5, abs=1e-6)
    decoder.load_state_dict(kept)
    targets = protocol["targets"]
    figures, _ = attack_figures(decoder, smashed[targets], images[targets])
    assert figures["mse"] == pytest.approx(protocol["mse"], abs=1e-6)
    assert figures["ssim"] == pytest.approx(protocol["ssim"], abs=1e-6)
    assert figures["psnr"] == pytest.approx(protocol["psnr"], abs=1e-4)
