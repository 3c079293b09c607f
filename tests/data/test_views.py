"""The views against MocoSFL's own (tests/fixtures/mocosfl/views.*, written by benchmarks/golden/views.py from its
datasets.py and utils.py): normalisation constants, its PIL Gaussian blur at fixed sigmas, and the two views its
mocov2 pair loader makes of real CIFAR-10 images under fixed seeds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mocosfl_fixtures import load_fixture
from PIL import Image
from torchvision import transforms

from functions.data.datasets import resolved_entry
from functions.methods.moco import moco_view_spec
from multicropdataset import FederatedViewsDataset, RadiusGaussianBlur, moco_transform, multicrop_transforms

pytestmark = pytest.mark.usefixtures("one_thread")

# Which of MocoSFL's constants each dataset's views use (its STL-10 pair loader normalises with CIFAR-10's).
MOCOSFL_CONSTANTS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "CIFAR10", "stl10_unlabelled": "CIFAR10",
                     "svhn": "SVHN", "svhn_extra": "SVHN", "tinyimagenet": "TINYIMAGENET", "imagenet12": "IMAGENET",
                     "imagefolder": "IMAGENET"}
# Same PIL calls and the same torchvision transforms on the same random numbers: equal up to float32 rounding.
TOLERANCE = 1e-6


@pytest.mark.parametrize("dataset", sorted(MOCOSFL_CONSTANTS))
def test_normalisation_constants_are_mocosfls(dataset: str) -> None:
    values, _ = load_fixture("views")
    entry = resolved_entry(dataset)
    expected = values["normalisation"][MOCOSFL_CONSTANTS[dataset]]
    assert list(entry.mean) == expected["mean"] and list(entry.std) == expected["std"]


def test_blur_at_fixed_sigmas_and_normalisation_are_mocosfls() -> None:
    values, tensors = load_fixture("views", with_tensors=True)
    images = tensors["images"].numpy()
    entry = resolved_entry("cifar10")
    chain = moco_transform(entry.mean, entry.std, blur_kernel_size=entry.blur_kernel_size).transforms
    blur = next(step.transforms[0] for step in chain
                if isinstance(step, transforms.RandomApply) and hasattr(step.transforms[0], "sigma"))
    assert isinstance(blur, RadiusGaussianBlur)
    to_normalised = chain[-2:]  # the views' ToTensor and Normalize
    normalised = iter(tensors["normalised"])
    for s, sigma in enumerate(values["fixed_sigmas"]):
        blur.sigma = (sigma, sigma)
        for i in range(len(values["image_indices"])):
            ours = blur(Image.fromarray(images[i]))
            assert np.array_equal(np.asarray(ours), tensors["blurred"][s, i].numpy()), (sigma, i)
            if i == 0 and sigma in values["normalised_sigmas"]:
                output = ours
                for transform in to_normalised:
                    output = transform(output)
                torch.testing.assert_close(output, next(normalised), atol=TOLERANCE, rtol=0)


def test_mocov2_views_are_those_of_mocosfls_pair_loader() -> None:
    values, tensors = load_fixture("views", with_tensors=True)
    count = len(values["pair_images"])
    images = np.ascontiguousarray(tensors["images"][-count:].numpy())
    entry = resolved_entry("cifar10")
    crops = multicrop_transforms(entry.mean, entry.std, moco_view_spec("mocov2", False, entry))
    dataset = FederatedViewsDataset(images, crops)
    assert [len(sigmas) for sigmas in values["pair_sigmas"]] == [2, 1, 0]  # both views blurred, one, none
    for i, key in enumerate(values["pair_keys"]):
        views = torch.stack(dataset[(i, key)])
        torch.testing.assert_close(views, tensors["pairs"][i], atol=TOLERANCE, rtol=0)
