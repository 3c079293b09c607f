"""Image similarity as MocoSFL measures it: SSIM and PSNR of reconstructions against originals in [0, 1].

SSIM follows MocoSFL's vendored pytorch_ssim: an 11 x 11 Gaussian window (sigma 1.5) applied to each channel by a
convolution with zero padding of 5 (so the border pixels see zeros), constants (0.01)^2 and (0.03)^2, and the
SSIM map averaged over channels and pixels. torchmetrics' SSIM pads by reflection and crops the border, which
gives lower values on the same images (0.817 against 0.876 on one set of reconstructions); ResSFL's target SSIM
and the attack's figures are in MocoSFL's convention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def gaussian_window(channels: int, size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA) -> Tensor:
    """The (channels, 1, size, size) depthwise kernel: the outer product of a normalised 1-D Gaussian."""
    centre = size // 2
    line = torch.tensor([math.exp(-(x - centre) ** 2 / (2 * sigma ** 2)) for x in range(size)], dtype=torch.float32)
    line = (line / line.sum()).unsqueeze(1)
    return (line @ line.t()).expand(channels, 1, size, size).contiguous()


def ssim_per_image(reconstructed: Tensor, originals: Tensor) -> Tensor:
    """SSIM of each reconstruction against its original, (B, C, H, W) in [0, 1] -> (B,), in MocoSFL's convention."""
    channels = reconstructed.shape[1]
    window = gaussian_window(channels).to(device=reconstructed.device, dtype=reconstructed.dtype)

    def local_mean(x: Tensor) -> Tensor:
        return F.conv2d(x, window, padding=WINDOW_SIZE // 2, groups=channels)

    mean_a, mean_b = local_mean(reconstructed), local_mean(originals)
    mean_aa, mean_bb, mean_ab = mean_a.pow(2), mean_b.pow(2), mean_a * mean_b
    var_a = local_mean(reconstructed * reconstructed) - mean_aa
    var_b = local_mean(originals * originals) - mean_bb
    covariance = local_mean(reconstructed * originals) - mean_ab
    ssim_map = ((2 * mean_ab + SSIM_C1) * (2 * covariance + SSIM_C2)) / (
        (mean_aa + mean_bb + SSIM_C1) * (var_a + var_b + SSIM_C2))
    return ssim_map.flatten(1).mean(dim=1)


def ssim(reconstructed: Tensor, originals: Tensor) -> Tensor:
    """Mean SSIM over the batch (MocoSFL's pytorch_ssim.SSIM() with size_average=True)."""
    return ssim_per_image(reconstructed, originals).mean()


def psnr_per_image(reconstructed: Tensor, originals: Tensor, peak: float = 1.0) -> Tensor:
    """PSNR in dB of each reconstruction against its original (MocoSFL's get_PSNR, image by image) -> (B,)."""
    mse = (reconstructed - originals).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(peak ** 2 / mse)
