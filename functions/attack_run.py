"""--attack: the model-inversion attack (functions.attack) on a finished run's client part, as a final evaluation.

The attacker gets the clients' model after the last FedAvg (what every client holds), up to --aux_images images
of --aux_data (another dataset read from --data_dir, or ``heldout``: the run's own test images, which no client
holds) and --attack_epochs epochs to train its decoder; it then rebuilds --attack_images of --attack_client's own
training images. metrics.json gets attack_mse, attack_ssim, attack_psnr and the mean image's figures
(attack_mean_image_*); the run folder gets attack.png (originals above reconstructions).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from functions.attack import DEFAULT_DECODER, invert, reconstruction_grid, save_reconstructions, to_unit_images
from functions.datasets import download_allowed, load_dataset
from functions.errors import UserError
from functions.evaluation import EvaluationContext
from functions.logs import TensorboardLog, logger

HELD_OUT = "heldout"


def decoder_name(mia_arch: str) -> str:
    """--MIA_arch as a decoder name: MocoSFL's default "custom" is this collection's default decoder."""
    return DEFAULT_DECODER if mia_arch == "custom" else mia_arch


def _sample(images: Any, count: int, seed: int) -> np.ndarray:
    """`count` images (all if fewer) drawn without replacement from the seed, as one uint8 array."""
    picked = np.sort(np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False))
    return np.asarray(images[picked])


def auxiliary_images(args: Any, size: tuple[int, int]) -> np.ndarray:
    """The attacker's images: --aux_data's training images (or the run's test images for "heldout")."""
    name = args.dataset if args.aux_data == HELD_OUT else args.aux_data
    dataset = load_dataset(name, args.data_dir, download=download_allowed(), seed=args.seed, data_size=args.data_size)
    images = dataset.test_images if args.aux_data == HELD_OUT else dataset.train_images
    if tuple(images.shape[1:3]) != tuple(size):
        raise UserError(f"--aux_data {args.aux_data} has {images.shape[1]}-pixel images, the run's are {size[0]}; "
                        f"choose auxiliary data of the same size, or --aux_data {HELD_OUT}")
    return _sample(images, args.aux_images, args.seed + 1)


def attack_on_client(context: EvaluationContext) -> dict[str, Any]:
    """Train the inversion decoder on auxiliary data, attack --attack_client's images; return the figures."""
    args = context.args
    if not 0 <= args.attack_client < args.num_client:
        raise UserError(f"--attack_client {args.attack_client} is not a client of this run (0..{args.num_client - 1})")
    if context.client_images is None:
        raise UserError("this evaluation has no client images to attack")
    client_images = context.client_images(args.attack_client)
    targets = to_unit_images(_sample(client_images, args.attack_images, args.seed))
    auxiliary = to_unit_images(auxiliary_images(args, tuple(client_images.shape[1:3])))
    mean = torch.tensor(context.mean, device=context.device).view(1, 3, 1, 1)
    std = torch.tensor(context.std, device=context.device).view(1, 3, 1, 1)
    client = context.client_model.eval()
    name = decoder_name(args.MIA_arch)
    logger.info(f"model-inversion attack: decoder {name}, {auxiliary.shape[0]} images of {args.aux_data}, "
                f"{args.attack_epochs} epochs, against client {args.attack_client}'s {targets.shape[0]} images")
    figures, reconstructed = invert(client, auxiliary, targets, normalise=lambda images: (images - mean) / std,
                                    decoder_name=name, epochs=args.attack_epochs, seed=args.seed,
                                    device=context.device)
    if context.is_main:
        save_reconstructions(Path(args.output_dir) / "attack.png", targets, reconstructed)
        board = TensorboardLog(Path(args.output_dir) / "tensorboard")
        board.image("attack/originals_above_reconstructions", reconstruction_grid(targets, reconstructed), 0)
        board.close()
    return {**{f"attack_{key}": value for key, value in figures.items()}, "attack_decoder": name,
            "attack_client": args.attack_client}
