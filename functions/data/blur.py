"""PIL's Gaussian blur as kernels: what MocoSFL's views blur with, for data paths that cannot call PIL (DALI).

PIL's GaussianBlur(radius=sigma) is three passes of a box blur along each axis, edges repeated. Each box has a
fractional radius r = l + a (Gwosdek et al., "Theoretical foundations of Gaussian convolution by extended box
filtering", 2011): weight 1 / (2r + 1) on its 2l + 1 central taps and a / (2r + 1) on the two outer ones, so that
the three passes have variance sigma^2 exactly. PIL rounds to 8 bits after every pass; the float version here does
not, which is the only difference from PIL (measured by benchmarks/blur_fidelity.py).
"""
from __future__ import annotations

import math

import numpy as np

PIL_BLUR_PASSES = 3


def pil_box_radius(sigma: float | np.ndarray, passes: int = PIL_BLUR_PASSES) -> float | np.ndarray:
    """The fractional box radius PIL blurs with, `passes` times, for a Gaussian of `sigma` pixels (element-wise)."""
    variance = np.square(sigma) / passes
    whole = np.floor((np.sqrt(12.0 * variance + 1.0) - 1.0) / 2.0)
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3.0 * variance) / (6.0 * (variance - (whole + 1) ** 2))
    return whole + fraction


def box_kernel_length(max_sigma: float) -> int:
    """Taps of a box kernel long enough for every sigma up to `max_sigma` (odd: 2 * whole radius + 3)."""
    return 2 * math.floor(pil_box_radius(max_sigma)) + 3


def pil_box_kernels(sigmas: np.ndarray, length: int) -> np.ndarray:
    """(len(sigmas), length) float64: one pass of PIL's box blur per sigma as a centred, zero-padded kernel."""
    radius = pil_box_radius(np.asarray(sigmas, dtype=np.float64))[:, None]
    whole = np.floor(radius)
    if length % 2 == 0 or (2 * whole.max(initial=0) + 3) > length:
        raise ValueError(f"box kernels for sigmas up to {np.max(sigmas)} need an odd length of at least "
                         f"{box_kernel_length(float(np.max(sigmas)))}, got {length}")
    distance = np.abs(np.arange(length) - length // 2)[None, :]
    weights = np.where(distance <= whole, 1.0, np.where(distance == whole + 1, radius - whole, 0.0))
    return weights / (2.0 * radius + 1.0)


def pil_box_kernel(sigma: float, length: int | None = None) -> np.ndarray:
    """One pass of PIL's box blur for `sigma` as a centred 1-D kernel, zero-padded to `length` taps."""
    return pil_box_kernels(np.array([sigma]), box_kernel_length(sigma) if length is None else int(length))[0]


def identity_kernel(length: int) -> np.ndarray:
    """A centred 1-D kernel of `length` taps that leaves an image as it is."""
    kernel = np.zeros(length)
    kernel[length // 2] = 1.0
    return kernel


def pil_blur_float(image: np.ndarray, sigma: float) -> np.ndarray:
    """PIL's blur of an (H, W, C) image in float, without its rounding after each pass: the DALI path's blur."""
    kernel = pil_box_kernel(sigma)
    half = kernel.size // 2
    blurred = np.asarray(image, dtype=np.float64)
    for axis in (1, 0):  # PIL blurs along rows first
        for _ in range(PIL_BLUR_PASSES):
            padding = [(0, 0)] * blurred.ndim
            padding[axis] = (half, half)
            padded = np.pad(blurred, padding, mode="edge")
            length = blurred.shape[axis]
            blurred = sum(weight * np.take(padded, np.arange(tap, tap + length), axis=axis)
                          for tap, weight in enumerate(kernel))
    return blurred
