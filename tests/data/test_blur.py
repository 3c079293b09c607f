"""PIL's Gaussian blur as box kernels (functions/data/blur.py), what the DALI path blurs with."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from functions.data.blur import PIL_BLUR_PASSES, box_kernel_length, pil_blur_float, pil_box_kernel, pil_box_kernels
from functions.data.datasets import load_dataset


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.37, 2.0])
def test_three_box_passes_have_the_variance_of_the_gaussian(sigma: float) -> None:
    kernel = pil_box_kernel(sigma)
    assert kernel.sum() == pytest.approx(1.0) and np.allclose(kernel, kernel[::-1])
    combined = np.array([1.0])
    for _ in range(PIL_BLUR_PASSES):
        combined = np.convolve(combined, kernel)
    offsets = np.arange(combined.size) - combined.size // 2
    assert (combined * offsets**2).sum() == pytest.approx(sigma**2, rel=1e-9)


def test_kernels_are_padded_to_one_length_and_refuse_a_short_one() -> None:
    length = box_kernel_length(2.0)
    assert length == 5
    kernels = pil_box_kernels(np.array([0.1, 1.0, 2.0]), length)
    assert kernels.shape == (3, 5) and np.allclose(kernels.sum(axis=1), 1.0)
    assert kernels[0, 0] == 0.0 and kernels[2, 0] > 0.0  # the small sigma's box is narrower
    with pytest.raises(ValueError, match="odd length"):
        pil_box_kernels(np.array([2.0]), 3)


def test_the_float_blur_is_pils_up_to_its_rounding_after_each_pass() -> None:
    images = load_dataset("synthetic", "unused", seed=3, synthetic_train=8, synthetic_test=1).train_images
    for sigma in (0.5, 1.0, 2.0):
        for image in images:
            pil = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=np.float64)
            gap = np.abs(pil_blur_float(image, sigma) - pil)
            # Six roundings to 8 bits: within 3 grey levels anywhere, under one on average.
            assert gap.max() <= 3.0 and gap.mean() < 1.0
