"""The model-inversion attack: near perfect on a client that sends its images, no better than the mean image on
one that sends nothing; decoder names and sizes; MocoSFL's protocol's pieces; the options, checked at the start.
(tests/privacy/test_attack_mocosfl.py compares the decoders, SSIM and MocoSFL's attack loop with MocoSFL's own code.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from functions.core.errors import UserError
from functions.data.datasets import load_dataset
from functions.privacy.attack import image_figures, invert, save_reconstructions, to_unit_images
from functions.privacy.attack_mocosfl import attack_set_size, jpeg_round_trip, split_pairs
from models.decoders import inversion_decoder


@pytest.fixture(scope="module")
def images(cifar10_mini_dir_module):
    dataset = load_dataset("cifar10", cifar10_mini_dir_module, download=False)
    mean = torch.tensor(dataset.mean).view(1, 3, 1, 1)
    std = torch.tensor(dataset.std).view(1, 3, 1, 1)
    return (to_unit_images(dataset.train_images[:512]), to_unit_images(dataset.test_images[:64]),
            lambda x: (x - mean) / std)


@pytest.fixture(scope="module")
def cifar10_mini_dir_module():
    from paths import CIFAR10_MINI

    if not (CIFAR10_MINI / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 sample not found at {CIFAR10_MINI}")
    return CIFAR10_MINI


def test_a_client_that_sends_its_images_is_rebuilt_almost_perfectly(images) -> None:
    auxiliary, targets, normalise = images
    figures, reconstructed = invert(torch.nn.Identity(), auxiliary, targets, normalise=normalise,
                                    decoder_name="conv_normN0C8", epochs=15)
    assert reconstructed.shape == targets.shape
    assert figures["ssim"] > 0.75 and figures["psnr"] > figures["mean_image_psnr"] + 8 and figures["mse"] < 0.01


def test_a_client_that_sends_zeros_gives_the_mean_image_figures(images) -> None:
    auxiliary, targets, normalise = images

    def zeros(batch: torch.Tensor) -> torch.Tensor:
        return torch.zeros(batch.shape[0], 4, 16, 16)

    figures, _ = invert(zeros, auxiliary, targets, normalise=normalise, decoder_name="conv_normN0C8", epochs=15,
                        lr=1e-2)
    # Nothing to decode: the best the attacker can learn is one image for all, the mean image at most.
    assert abs(figures["psnr"] - figures["mean_image_psnr"]) < 2.0
    assert figures["ssim"] < figures["mean_image_ssim"] + 0.05


def test_figures_of_identical_and_opposite_images() -> None:
    generator = torch.Generator().manual_seed(0)
    originals = torch.rand(4, 3, 16, 16, generator=generator)
    same = image_figures(originals, originals)
    assert same["mse"] == 0 and same["ssim"] == pytest.approx(1.0, abs=1e-4) and same["psnr"] > 60
    opposite = image_figures(1 - originals, originals)
    assert opposite["ssim"] < 0 and opposite["psnr"] < 10


@pytest.mark.parametrize("name, in_size, upsamplings", [("conv_normN2C16", 32, 0), ("res_normN4C64", 16, 1),
                                                       ("res_normN1C8", 8, 2), ("custom", 8, 2),
                                                       ("conv_normN0C8", 4, 3)])
def test_decoders_double_up_to_the_image_size(name: str, in_size: int, upsamplings: int) -> None:
    decoder = inversion_decoder(name, in_channels=5, in_size=in_size, out_size=32)
    with torch.no_grad():
        output = decoder(torch.randn(2, 5, in_size, in_size))
    assert output.shape == (2, 3, 32, 32) and 0 <= float(output.min()) and float(output.max()) <= 1
    assert sum(isinstance(layer, torch.nn.ConvTranspose2d) for layer in decoder) == upsamplings


def test_bad_decoder_names_and_sizes_are_one_line() -> None:
    with pytest.raises(UserError, match="not a decoder name"):
        inversion_decoder("resnet", 4, 16, 32)
    with pytest.raises(UserError, match="power of two"):
        inversion_decoder("conv_normN1C8", 4, 12, 32)
    with pytest.raises(UserError, match="power of two"):
        inversion_decoder("custom", 4, 64, 32)


# ------------------------------------------------------------------------------------- MocoSFL's protocol's pieces
def test_the_jpeg_round_trip_is_that_of_mocosfls_image_files(tmp_path: Path) -> None:
    from PIL import Image
    from torchvision.transforms.functional import to_tensor
    from torchvision.utils import save_image

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = []
    for index, image in enumerate(images):  # MocoSFL: save_image to <n>.jpg, then PIL and ToTensor
        save_image(image[None], str(tmp_path / f"{index}.jpg"))
        expected.append(to_tensor(Image.open(tmp_path / f"{index}.jpg")))
    assert torch.equal(jpeg_round_trip(images), torch.stack(expected))
    assert not torch.equal(jpeg_round_trip(images), images)


def test_the_attackers_pairs_split_as_mocosfls_seeded_shuffle() -> None:
    import numpy as np

    for count in (51, 517):
        indices = list(range(count))  # MocoSFL: np.random.seed(123), then np.random.shuffle of the index list
        np.random.seed(123)
        np.random.shuffle(indices)
        cut = int(np.floor(0.9 * count))
        train, validation = split_pairs(count)
        assert train.tolist() == indices[:cut] and validation.tolist() == indices[cut:]


def test_the_attacker_gets_one_percent_and_too_few_images_are_refused() -> None:
    assert attack_set_size(50000, 0.01) == 500  # MocoSFL's CIFAR-10 attacker: 450 to train, 50 to validate
    with pytest.raises(UserError, match="raise --attack_data_proportion"):
        attack_set_size(517, 0.01)


def test_the_picture_puts_originals_above_reconstructions(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    originals, reconstructed = torch.zeros(3, 3, 8, 8), torch.ones(3, 3, 8, 8)
    save_reconstructions(tmp_path / "attack.png", originals, reconstructed)
    picture = np.asarray(Image.open(tmp_path / "attack.png").convert("L"))
    assert picture.shape == (2 * 10 + 2, 3 * 10 + 2)
    assert picture[2:10, 2:10].max() == 0 and picture[12:20, 2:10].min() == 255


# ------------------------------------------------------------------------------------------- --attack in a run
@pytest.mark.parametrize("protocol", ["auxiliary", "mocosfl"])
def test_attack_after_training_and_on_a_saved_run(tmp_path: Path, cifar10_mini_dir_module, protocol: str) -> None:
    import json

    from configs import parse_args
    from functions.train.runner import run

    common = ["--data_dir", str(cifar10_mini_dir_module), "--attack", "--aux_data", "heldout", "--aux_images", "64",
              "--attack_epochs", "1", "--attack_images", "8", "--MIA_arch", "conv_normN0C8",
              "--attack_protocol", protocol, "--attack_data_proportion", "0.2"]
    results = run(parse_args("moco", [
        "--dataset", "cifar10", "--data_proportion", "0.02", "--width", "4", "--num_client", "2", "--batch_size", "8",
        "--num_epoch", "1", "--max_steps", "2", "--eval_freq", "0", "--skip_linear", "--num_workers", "0",
        "--K", "32", "--K_dim", "8", "--output_dir", str(tmp_path / "run"), *common]))
    for key in ("attack_mse", "attack_ssim", "attack_psnr", "attack_ssim_torchmetrics", "attack_mean_image_mse",
                "attack_mean_image_ssim", "attack_mean_image_psnr"):
        assert isinstance(results[key], float), key
    # MocoSFL's protocol always uses res_normN4C64 (its run_sflmoco.py), whatever --MIA_arch says.
    assert results["attack_decoder"] == ("res_normN4C64" if protocol == "mocosfl" else "conv_normN0C8")
    assert results["attack_protocol"] == protocol
    assert ("attack_best_validation_loss" in results) == (protocol == "mocosfl")
    # SSIM in MocoSFL's convention, torchmetrics' beside it: two conventions, two values.
    assert results["attack_ssim"] != results["attack_ssim_torchmetrics"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["attack_psnr"] == results[
        "attack_psnr"]
    assert (tmp_path / "run" / "attack.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    board.Reload()
    assert "attack/originals_above_reconstructions" in board.Tags()["images"]
    # A saved run attacked again: the same seed and model give the same figures (the attack is reproducible).
    again = run(parse_args("moco", ["--eval_only", "--checkpoint", str(tmp_path / "run" / "checkpoint_last.pt"),
                                    "--skip_linear", *common]))
    assert again["attack_psnr"] == pytest.approx(results["attack_psnr"], abs=1e-4)
    assert (tmp_path / "run" / "eval_only" / "attack.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--attack", "--attack_epochs", "0"], "--attack_epochs must be"),
    (["--attack", "--MIA_arch", "resnet"], "not a decoder name"),
    (["--enable_ressfl", "--MIA_arch", "res_normN4"], "not a decoder name"),
    (["--attack", "--num_client", "2", "--attack_client", "2"], "--attack_client 2 is not a client"),
    (["--attack", "--aux_data", "cifar1000"], "unknown dataset 'cifar1000'"),
    (["--attack", "--attack_protocol", "mocosfl", "--attack_data_proportion", "0"], "--attack_data_proportion"),
    (["--attack", "--attack_protocol", "paper"], "--attack_protocol"),
])
def test_attack_options_are_checked_in_one_line_before_training(argv, message) -> None:
    from configs import parse_args

    with pytest.raises(UserError, match=message):
        parse_args("moco", argv)


def test_too_few_images_for_mocosfls_attacker_stop_the_run_before_training(tmp_path: Path,
                                                                           cifar10_mini_dir_module) -> None:
    from configs import parse_args
    from functions.train.runner import run

    args = parse_args("moco", ["--dataset", "cifar10", "--data_dir", str(cifar10_mini_dir_module),
                               "--data_proportion", "0.02", "--width", "4", "--num_client", "2", "--batch_size", "8",
                               "--num_epoch", "1", "--eval_freq", "0", "--skip_linear", "--num_workers", "0",
                               "--K", "32", "--K_dim", "8", "--output_dir", str(tmp_path / "run"), "--attack",
                               "--attack_protocol", "mocosfl"])
    with pytest.raises(UserError, match="raise --attack_data_proportion"):
        run(args)
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("aux_data, message", [("cifar100", "CIFAR-100 not found"), ("tinyimagenet", "64-pixel images")])
def test_auxiliary_data_missing_or_of_another_size_stops_the_run_before_training(tmp_path: Path, monkeypatch,
                                                                                aux_data, message) -> None:
    from dataset_files import write_tiny_imagenet
    from sfl_helpers import TINY_MOCO

    from configs import parse_args
    from functions.data.datasets import NO_DOWNLOAD_ENV
    from functions.train.runner import run

    monkeypatch.setenv(NO_DOWNLOAD_ENV, "1")
    write_tiny_imagenet(tmp_path / "data")  # 64-pixel images; no CIFAR-100 there
    args = parse_args("moco", [*TINY_MOCO, "--num_client", "2", "--batch_size", "8", "--data_dir",
                               str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), "--attack",
                               "--aux_data", aux_data])
    with pytest.raises(UserError, match=message):
        run(args)
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()
