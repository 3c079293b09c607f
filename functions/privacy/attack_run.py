"""--attack: the model-inversion attack on a finished run's client part, as a final evaluation.

Both protocols attack the clients' model after the last FedAvg (what every client holds) and rebuild
--attack_images of --attack_client's own training images (fixed by --seed). --attack_protocol auxiliary (the
default; functions.privacy.attack): the decoder learns for --attack_epochs epochs from up to --aux_images images of
--aux_data (another dataset read from --data_dir, or ``heldout``: the run's own test images, which no client holds).
--attack_protocol mocosfl (functions.attack_mocosfl): MocoSFL's attack, whose attacker learns from
--attack_data_proportion of the run's training images. metrics.json gets attack_mse, attack_ssim, attack_psnr,
attack_ssim_torchmetrics and the mean image's figures (attack_mean_image_*); the run folder gets attack.png
(originals above reconstructions).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from functions.core.errors import UserError
from functions.core.logs import TensorboardLog, logger
from functions.data.datasets import download_allowed, load_dataset
from functions.evaluation.context import EvaluationContext
from functions.privacy.attack import DEFAULT_DECODER, invert, reconstruction_grid, save_reconstructions, to_unit_images
from functions.privacy.attack_mocosfl import MOCOSFL_DECODER, attack_set_size, invert_mocosfl
from functions.privacy.attack_options import AttackOptions

HELD_OUT = "heldout"


def decoder_name(mia_arch: str) -> str:
    """--MIA_arch as a decoder name: MocoSFL's default "custom" is this collection's default decoder."""
    return DEFAULT_DECODER if mia_arch == "custom" else mia_arch


def sample_images(images: Any, count: int, seed: int) -> np.ndarray:
    """`count` images (all if fewer) drawn without replacement from the seed, as one uint8 array."""
    picked = np.sort(np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False))
    return np.asarray(images[picked])


def auxiliary_images(options: AttackOptions, size: tuple[int, int]) -> np.ndarray:
    """The attacker's images: --aux_data's training images (or the run's test images for "heldout")."""
    name = options.dataset if options.aux_data == HELD_OUT else options.aux_data
    dataset = load_dataset(name, options.data_dir, download=download_allowed(), seed=options.seed,
                           data_size=options.data_size)
    images = dataset.test_images if options.aux_data == HELD_OUT else dataset.train_images
    if tuple(images.shape[1:3]) != tuple(size):
        raise UserError(f"--aux_data {options.aux_data} has {images.shape[1]}-pixel images, the run's are {size[0]}; "
                        f"choose auxiliary data of the same size, or --aux_data {HELD_OUT}")
    return sample_images(images, options.aux_images, options.seed + 1)


def _attack_options(context: EvaluationContext) -> AttackOptions:
    """The attack's group of the evaluated run; a UserError when the run has none (no --attack)."""
    if context.options.attack is None:
        raise UserError("this evaluation has no attack options; pass --attack")
    return context.options.attack


def _attack_targets(context: EvaluationContext, options: AttackOptions) -> tuple[np.ndarray, torch.Tensor]:
    """--attack_client's training images (uint8) and --attack_images of them, fixed by --seed, in [0, 1]."""
    if context.client_images is None:
        raise UserError("this evaluation has no client images to attack")
    client_images = context.client_images(options.attack_client)
    return client_images, to_unit_images(sample_images(client_images, options.attack_images, options.seed))


def attack_on_client(context: EvaluationContext) -> dict[str, Any]:
    """Attack --attack_client's images with --attack_protocol's attacker; return the figures."""
    options = _attack_options(context)
    client_images, targets = _attack_targets(context, options)
    mean = torch.tensor(context.mean, device=context.device).view(1, 3, 1, 1)
    std = torch.tensor(context.std, device=context.device).view(1, 3, 1, 1)
    client = context.client_model.eval()
    if options.attack_protocol == "mocosfl":
        if context.train_images is None:
            raise UserError("this evaluation has no training images for MocoSFL's attacker")
        train_images = context.train_images()
        count = attack_set_size(len(train_images), options.attack_data_proportion)
        attack_images = to_unit_images(sample_images(train_images, count, options.seed + 1))
        name = MOCOSFL_DECODER
        logger.info(f"model-inversion attack (MocoSFL's protocol): decoder {name}, {count} of the run's training "
                    f"images, {options.attack_epochs} epochs, against client {options.attack_client}'s "
                    f"{targets.shape[0]} images")
        figures, reconstructed = invert_mocosfl(client, attack_images, targets,
                                                normalise=lambda images: (images - mean) / std,
                                                epochs=options.attack_epochs, seed=options.seed, device=context.device)
    else:
        auxiliary = to_unit_images(auxiliary_images(options, tuple(client_images.shape[1:3])))
        name = decoder_name(options.MIA_arch)
        logger.info(f"model-inversion attack: decoder {name}, {auxiliary.shape[0]} images of {options.aux_data}, "
                    f"{options.attack_epochs} epochs, against client {options.attack_client}'s {targets.shape[0]} "
                    "images")
        figures, reconstructed = invert(client, auxiliary, targets, normalise=lambda images: (images - mean) / std,
                                        decoder_name=name, epochs=options.attack_epochs, seed=options.seed,
                                        device=context.device)
    if context.is_main:
        save_reconstructions(Path(options.output_dir) / "attack.png", targets, reconstructed)
        board = TensorboardLog(Path(options.output_dir) / "tensorboard")
        board.image("attack/originals_above_reconstructions", reconstruction_grid(targets, reconstructed), 0)
        board.close()
    return {**{f"attack_{key}": value for key, value in figures.items()}, "attack_decoder": name,
            "attack_client": options.attack_client, "attack_protocol": options.attack_protocol}
