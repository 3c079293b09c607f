"""How the views' Gaussian blur compares with MocoSFL's (PIL's GaussianBlur(radius=sigma)) on real CIFAR-10 images.

    python benchmarks/blur_fidelity.py --data_dir ../shared/data/cifar10-mini --images 500

Per sigma, in grey levels (0-255) averaged over pixels and images: how much PIL's blur changes an image, how much
the former fixed 3x3 kernel did, and how far from PIL's result are this project's blurs: the torch path (PIL
itself), the float reproduction (functions.data.blur, what DALI computes) and, where DALI is installed, the DALI path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from functions.data.blur import pil_blur_float  # noqa: E402
from functions.data.datasets import load_dataset  # noqa: E402
from multicropdataset import GaussianBlur, RadiusGaussianBlur  # noqa: E402

SIGMAS = (0.1, 0.5, 1.0, 1.5, 2.0)


def dali_blur(images: np.ndarray, sigma: float) -> np.ndarray | None:
    """The DALI path's blur (CPU operators) of every image at `sigma`, in grey levels; None without DALI."""
    try:
        from Dali.get_dali_dataloader import CropParameters, DaliCropAugmenter
    except ImportError:
        return None
    rows, size = images.shape[0], images.shape[1]
    augmenter = DaliCropAugmenter([size], (0.0, 0.0, 0.0), (1 / 255,) * 3, max_batch_size=rows, dali_device="cpu",
                                  output_device=torch.device("cpu"), num_threads=2)
    parameters = CropParameters.identity(rows, size, size)
    parameters.blur_sigma[:] = sigma
    [(_, [crops])] = list(augmenter.stream([(images, [parameters], None)]))
    return crops.permute(0, 2, 3, 1).numpy().astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="../shared/data/cifar10-mini")
    parser.add_argument("--images", type=int, default=500)
    options = parser.parse_args()
    images = load_dataset("cifar10", options.data_dir, download=False).train_images[:options.images]
    print(f"{len(images)} CIFAR-10 images of {options.data_dir}; mean absolute difference in grey levels (max)")
    print("| sigma | PIL blur's change (MocoSFL) | former 3x3 kernel's change | torch path vs PIL "
          "| float reproduction vs PIL | DALI vs PIL |")
    print("| --- | --- | --- | --- | --- | --- |")
    for sigma in SIGMAS:
        pil = np.stack([np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))
                        for image in images]).astype(np.float64)
        fixed = GaussianBlur(3, (sigma, sigma))
        old = np.stack([np.asarray(fixed(Image.fromarray(image))) for image in images]).astype(np.float64)
        ours = RadiusGaussianBlur((sigma, sigma))
        torch_path = np.stack([np.asarray(ours(Image.fromarray(image))) for image in images]).astype(np.float64)
        reproduced = np.stack([pil_blur_float(image, sigma) for image in images])
        dali = dali_blur(images, sigma)
        source = images.astype(np.float64)

        def gap(a: np.ndarray, b: np.ndarray) -> str:
            return f"{np.abs(a - b).mean():.3f} ({np.abs(a - b).max():.1f})"

        print(f"| {sigma} | {np.abs(pil - source).mean():.2f} | {np.abs(old - source).mean():.2f} | "
              f"{gap(torch_path, pil)} | {gap(reproduced, pil)} | {gap(dali, pil) if dali is not None else 'n/a'} |")


if __name__ == "__main__":
    main()
