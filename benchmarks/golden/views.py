"""Golden part: MocoSFL's views of real CIFAR-10 images, from its own pair loader and blur.

Records (a) MocoSFL's normalisation constants of every dataset it has, (b) its Gaussian blur (utils.GaussianBlur)
at fixed sigmas on a few images, 8-bit, and normalised with its CIFAR-10 constants, and (c) the two views its
mocov2 pair loader (datasets.get_cifar10_pairloader) makes of a few images under fixed seeds (torch's and Python's
random state both seeded with the key, as this project's loader seeds them per sample), with the blur's sigmas.

    python benchmarks/golden/views.py --peer_dir MOCOSFL_CHECKOUT [--cifar_dir ../shared/data/cifar10-mini]
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import peer

DEFAULT_CIFAR = peer.REPO_ROOT.parent / "shared" / "data" / "cifar10-mini"
IMAGE_INDICES = (0, 1, 2, 3)  # of the first training batch
FIXED_SIGMAS = (0.1, 0.5, 1.0, 1.5, 2.0)
NORMALISED_SIGMAS = (1.0, 2.0)  # image 0, blurred and normalised
PAIR_IMAGES = (4, 5, 6)
CANDIDATE_KEYS = range(1000, 1100)
DATASET_CONSTANTS = ("CIFAR10", "CIFAR100", "STL10", "SVHN", "TINYIMAGENET", "IMAGENET")


def cifar_pair_dataset(datasets_module: Any, cifar_dir: Path) -> Any:
    """The CIFAR10Pair dataset of MocoSFL's mocov2 pair loader, reading the trimmed CIFAR-10 folder."""
    import torchvision.datasets.cifar as tv_cifar

    # The trimmed copy's checksums are not the official ones; nothing is downloaded.
    tv_cifar.check_integrity = lambda *args, **kwargs: True
    tv_cifar.CIFAR10._check_integrity = lambda self: True
    tv_cifar.CIFAR10.download = lambda self: None
    loaders = datasets_module.get_cifar10_pairloader(batch_size=1, num_workers=0, shuffle=False, num_client=1,
                                                     pairloader_option="mocov2", path_to_data=str(cifar_dir))
    return loaders[0].dataset.dataset  # the DataLoader's Subset's dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_dir", required=True)
    parser.add_argument("--cifar_dir", default=str(DEFAULT_CIFAR), help="holds cifar-10-batches-py/")
    options = parser.parse_args()
    peer.import_mocosfl(options.peer_dir)
    import random

    import numpy as np
    import torch
    from PIL import Image
    from torchvision import transforms

    import datasets  # MocoSFL's
    import utils  # MocoSFL's

    constants = {name: {"mean": list(getattr(datasets, f"{name}_TRAIN_MEAN")),
                        "std": list(getattr(datasets, f"{name}_TRAIN_STD"))} for name in DATASET_CONSTANTS}
    pair_dataset = cifar_pair_dataset(datasets, Path(options.cifar_dir))
    images = np.stack([pair_dataset.data[index] for index in IMAGE_INDICES + PAIR_IMAGES])

    normalise = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize(datasets.CIFAR10_TRAIN_MEAN, datasets.CIFAR10_TRAIN_STD)])
    blurred = torch.zeros(len(FIXED_SIGMAS), len(IMAGE_INDICES), 32, 32, 3, dtype=torch.uint8)
    normalised = []
    for s, sigma in enumerate(FIXED_SIGMAS):
        blur = utils.GaussianBlur([sigma, sigma])
        for i in range(len(IMAGE_INDICES)):
            result = blur(Image.fromarray(images[i]))
            blurred[s, i] = torch.from_numpy(np.asarray(result).copy())
            if i == 0 and sigma in NORMALISED_SIGMAS:
                normalised.append(normalise(result))

    drawn: list[float] = []
    plain_call = utils.GaussianBlur.__call__

    def logged_call(self: Any, image: Any) -> Any:
        state = random.getstate()
        drawn.append(random.uniform(self.sigma[0], self.sigma[1]))
        random.setstate(state)  # the blur draws the same number again
        return plain_call(self, image)

    utils.GaussianBlur.__call__ = logged_call
    pairs, keys, sigmas = [], [], []
    for index in PAIR_IMAGES:
        # The first key whose views blur as this image's slot asks: both, the first only, neither.
        wanted = {PAIR_IMAGES[0]: 2, PAIR_IMAGES[1]: 1, PAIR_IMAGES[2]: 0}[index]
        for key in CANDIDATE_KEYS:
            drawn.clear()
            torch.manual_seed(key)
            random.seed(key)
            views = pair_dataset[index]
            if len(drawn) == wanted:
                break
        pairs.append(torch.stack(views))
        keys.append(key)
        sigmas.append(list(drawn))
    peer.write_fixture("views", options.peer_dir, {
        "normalisation": constants, "image_indices": list(IMAGE_INDICES), "fixed_sigmas": list(FIXED_SIGMAS),
        "normalised_sigmas": list(NORMALISED_SIGMAS), "pair_images": list(PAIR_IMAGES), "pair_keys": keys,
        "pair_sigmas": sigmas, "pair_transform": re.sub(r" at 0x[0-9a-f]+", "", repr(pair_dataset.transform)),
        "stl10_note": "STL10 is MocoSFL's evaluation constants; its STL-10 pair loader normalises with CIFAR10's",
        "source": "first images of data_batch_1 of ../shared/data/cifar10-mini (the official CIFAR-10 order)",
    }, {"images": torch.from_numpy(images), "blurred": blurred, "normalised": torch.stack(normalised),
        "pairs": torch.stack(pairs)})


if __name__ == "__main__":
    main()
