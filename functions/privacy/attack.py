"""Model-inversion attack on smashed data: how well can a decoder rebuild a client's images from what it sends?

The attacker holds images and a frozen copy of the target's client part; it trains a decoder (models.decoders,
MocoSFL's family) from the client's smashed data back to the images (mean squared error, Adam), then rebuilds the
target client's own images from their smashed data. The figures are the mean over the targets of each image's MSE,
SSIM and PSNR (pixels in [0, 1]; SSIM in MocoSFL's convention, functions.image_quality, with torchmetrics' SSIM
beside it), and the same figures for the attacker's training images' mean image, the reconstruction of an
attacker that learned nothing.

This module is the "auxiliary" protocol (--attack_protocol auxiliary): the decoder learns from auxiliary images
for a fixed number of epochs and the last decoder attacks. functions.attack_mocosfl is MocoSFL's protocol.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from functions.core.errors import UserError
from functions.privacy.image_quality import psnr_per_image, ssim_per_image
from models.decoders import inversion_decoder

DEFAULT_DECODER = "res_normN4C64"


def image_figures(reconstructed: Tensor, originals: Tensor) -> dict[str, float]:
    """Mean MSE, SSIM (MocoSFL's convention) and PSNR (dB) over images, and torchmetrics' SSIM, of reconstructions
    against originals, both (B, 3, H, W) in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    reconstructed, originals = reconstructed.float().clamp(0, 1), originals.float()
    with torch.no_grad():
        return {"mse": float(F.mse_loss(reconstructed, originals)),
                "ssim": float(ssim_per_image(reconstructed, originals).mean()),
                "psnr": float(psnr_per_image(reconstructed, originals).mean()),
                "ssim_torchmetrics": float(structural_similarity_index_measure(reconstructed, originals,
                                                                               data_range=1.0))}


def to_unit_images(images: np.ndarray | Tensor) -> Tensor:
    """uint8 NHWC images as float (B, 3, H, W) in [0, 1]."""
    tensor = torch.as_tensor(np.asarray(images))
    return tensor.permute(0, 3, 1, 2).float().div(255.0)


def _batches(images: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(images.shape[0], generator=generator)
    for start in range(0, images.shape[0], batch_size):
        yield images[order[start : start + batch_size]]


def invert(client: Callable[[Tensor], Tensor], auxiliary: Tensor, targets: Tensor, *,
           normalise: Callable[[Tensor], Tensor], decoder_name: str = DEFAULT_DECODER, epochs: int = 50,
           batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
           device: torch.device | str = "cpu") -> tuple[dict[str, float], Tensor]:
    """Train a decoder on the auxiliary images' smashed data, rebuild the targets; return the figures (attack and
    mean-image baseline) and the reconstructions. Images are (B, 3, H, W) in [0, 1]; `normalise` maps them to
    the client's input; the client is used frozen (no gradients reach it)."""
    if auxiliary.shape[0] < 2 or targets.shape[0] < 1:
        raise UserError("the attack needs at least two auxiliary images and one target image")
    device = torch.device(device)
    with torch.no_grad():
        sample = client(normalise(auxiliary[:2].to(device)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = inversion_decoder(decoder_name, sample.shape[1], sample.shape[-1], auxiliary.shape[-1]).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    decoder.train()
    for _ in range(epochs):
        for images in _batches(auxiliary, batch_size, generator):
            if images.shape[0] < 2:
                continue  # BatchNorm needs two images
            images = images.to(device)
            with torch.no_grad():
                smashed = client(normalise(images)).float()
            loss = F.mse_loss(decoder(smashed), images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    decoder.eval()
    with torch.no_grad():
        reconstructed = torch.cat([decoder(client(normalise(targets[start : start + 256].to(device))).float()).cpu()
                                   for start in range(0, targets.shape[0], 256)])
    figures = image_figures(reconstructed, targets)
    mean_image = auxiliary.mean(dim=0, keepdim=True).expand_as(targets)
    baseline = image_figures(mean_image, targets)
    return {**figures, **{f"mean_image_{key}": value for key, value in baseline.items()}}, reconstructed


def reconstruction_grid(originals: Tensor, reconstructed: Tensor, count: int = 8) -> Tensor:
    """One (3, H, W) picture: `count` originals (top row) above their reconstructions (bottom row)."""
    from torchvision.utils import make_grid

    count = min(count, originals.shape[0])
    return make_grid(torch.cat([originals[:count], reconstructed[:count].clamp(0, 1)]), nrow=count, padding=2)


def save_reconstructions(path, originals: Tensor, reconstructed: Tensor, count: int = 8) -> None:
    """A PNG of reconstruction_grid: `count` originals above their reconstructions."""
    from torchvision.utils import save_image

    save_image(reconstruction_grid(originals, reconstructed, count), str(path))
