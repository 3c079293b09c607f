"""Model-inversion attack on smashed data: how well can a decoder rebuild a client's images from what it sends?

The attacker holds auxiliary images and a frozen copy of the target's client part; it trains a decoder from the
client's smashed data back to the images (mean squared error, Adam), then rebuilds the target client's own images
from their smashed data. The figures are MSE, SSIM and PSNR of those reconstructions (pixels in [0, 1]; SSIM and
PSNR from torchmetrics), next to the same figures for the training images' mean image, the reconstruction of an
attacker that learned nothing.

Decoders follow the naming of MocoSFL's attacker (``--MIA_arch``): ``conv_normN<N>C<C>`` is a 3x3 convolution
into C channels, N more convolution layers, as many stride-2 transposed convolutions as the smashed data is
smaller than the image (a factor of two each), and a 3x3 convolution to RGB with a sigmoid, every hidden layer
followed by BatchNorm and ReLU; ``res_normN<N>C<C>`` has N residual blocks in place of the N convolution layers.
This is the family, not a copy of MocoSFL's layer list.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from functions.errors import UserError

DEFAULT_DECODER = "res_normN4C64"
_DECODER_NAME = re.compile(r"^(conv|res)_normN(\d+)C(\d+)$")


def _norm_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, added to the input, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), *_norm_relu(channels),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


def inversion_decoder(name: str, in_channels: int, in_size: int, out_size: int) -> nn.Module:
    """A decoder named like MocoSFL's (``conv_normN2C64``, ``res_normN4C64``) from smashed data of in_channels x
    in_size x in_size to RGB images of out_size x out_size in [0, 1]."""
    match = _DECODER_NAME.match(name)
    if match is None:
        raise UserError(f"--MIA_arch {name!r} is not a decoder name: use conv_normN<N>C<C> or res_normN<N>C<C>, "
                        f"e.g. {DEFAULT_DECODER}")
    kind, depth, channels = match.group(1), int(match.group(2)), int(match.group(3))
    if channels < 1:
        raise UserError(f"--MIA_arch {name}: the decoder needs at least one channel")
    ratio = out_size / in_size
    upsamplings = int(round(math.log2(ratio))) if ratio >= 1 else -1
    if upsamplings < 0 or 2 ** upsamplings * in_size != out_size:
        raise UserError(f"smashed data of {in_size} pixels cannot be decoded to {out_size}-pixel images by "
                        "doubling; the attack needs an image side a power of two times the smashed data's")
    layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1), *_norm_relu(channels)]
    for _ in range(depth):
        layers += ([ResidualBlock(channels)] if kind == "res" else
                   [nn.Conv2d(channels, channels, 3, padding=1), *_norm_relu(channels)])
    for _ in range(upsamplings):
        layers += [nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1),
                   *_norm_relu(channels)]
    layers += [nn.Conv2d(channels, 3, 3, padding=1), nn.Sigmoid()]
    return nn.Sequential(*layers)


def image_figures(reconstructed: Tensor, originals: Tensor) -> dict[str, float]:
    """MSE, SSIM and PSNR (dB) of reconstructions against originals, both (B, 3, H, W) in [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    reconstructed, originals = reconstructed.float().clamp(0, 1), originals.float()
    return {"mse": float(F.mse_loss(reconstructed, originals)),
            "ssim": float(structural_similarity_index_measure(reconstructed, originals, data_range=1.0)),
            "psnr": float(peak_signal_noise_ratio(reconstructed, originals, data_range=1.0))}


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
