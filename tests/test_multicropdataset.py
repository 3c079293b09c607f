"""Tests of the torchvision augmentations, the per-sample views dataset and the torch loaders."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

from functions.core.errors import UserError
from functions.data.image_folder import ImageFiles
from functions.data.loaders import FederatedSchedule
from functions.data.views import ViewSpec
from multicropdataset import (
    FederatedViewsDataset,
    GaussianBlur,
    build_torch_loaders,
    moco_transform,
    multicrop_transforms,
)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
SWAV_CIFAR = dict(nmb_crops=[2, 6], size_crops=[32, 16], min_scale_crops=[0.14, 0.05], max_scale_crops=[1.0, 0.14])


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 32, 32, 3) images and int64 labels of one CIFAR-10 python batch file."""
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="latin1")
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch["labels"], dtype=np.int64)


@pytest.fixture
def real_images(cifar10_mini_dir: Path) -> np.ndarray:
    """The first real CIFAR-10 training batch of the sample."""
    return read_cifar_batch(cifar10_mini_dir / "cifar-10-batches-py" / "data_batch_1")[0]


def synthetic_images(count: int, seed: int = 0) -> np.ndarray:
    """Random uint8 (count, 32, 32, 3) images."""
    return np.random.default_rng(seed).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)


def normalised_bounds() -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (low, high) of a normalised image whose pixels lie in [0, 1]."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def is_grayscale(crop: torch.Tensor) -> bool:
    """Whether a normalised crop has equal RGB channels once un-normalised."""
    pixels = crop * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    return bool(torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5))


def test_moco_views_shape_dtype_and_range(real_images: np.ndarray) -> None:
    dataset = FederatedViewsDataset(real_images, [moco_transform(MEAN, STD)] * 2)
    low, high = normalised_bounds()
    for index in range(20):
        views = dataset[(index, 1000 + index)]
        assert len(views) == 2
        for view in views:
            assert view.shape == (3, 32, 32) and view.dtype == torch.float32
            assert (view >= low - 1e-5).all() and (view <= high + 1e-5).all()
        assert not torch.equal(views[0], views[1])


def test_multicrop_views_come_in_crop_order(real_images: np.ndarray) -> None:
    crops = multicrop_transforms(MEAN, STD, ViewSpec(**SWAV_CIFAR))
    views = FederatedViewsDataset(real_images, crops)[(3, 77)]
    assert [tuple(view.shape) for view in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6
    assert all(view.dtype == torch.float32 for view in views)
    low, high = normalised_bounds()
    assert all((view >= low - 1e-5).all() and (view <= high + 1e-5).all() for view in views)


def test_same_key_same_crops_different_key_different_crops(real_images: np.ndarray) -> None:
    dataset = FederatedViewsDataset(real_images, multicrop_transforms(MEAN, STD, ViewSpec(**SWAV_CIFAR)))
    first = dataset[(5, 2**63 + 12345)]
    torch.rand(7)  # unrelated use of the global generator in between must not matter
    second = dataset[(5, 2**63 + 12345)]
    other = dataset[(5, 2**63 + 12346)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_augmenting_a_sample_leaves_the_global_random_states_alone() -> None:
    # With --num_workers 0 the views are made in the training process: its random streams must not move.
    import random

    dataset = FederatedViewsDataset(synthetic_images(4), multicrop_transforms(MEAN, STD, ViewSpec(**SWAV_CIFAR)))
    torch.manual_seed(11)
    random.seed(11)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(11)
    random.seed(11)
    dataset[(2, 99)]
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_grayscale_fraction_is_about_one_fifth(real_images: np.ndarray) -> None:
    dataset = FederatedViewsDataset(real_images, [moco_transform(MEAN, STD)])
    colour_images = [i for i in range(400) if not np.array_equal(real_images[i, ..., 0], real_images[i, ..., 1])]
    samples = 500
    grayscale = sum(is_grayscale(dataset[(colour_images[k % len(colour_images)], k)][0]) for k in range(samples))
    # Binomial(500, 0.2): standard deviation 0.018, so 0.06 is over three of them.
    assert abs(grayscale / samples - 0.2) < 0.06


def random_resized_crops(compose: transforms.Compose) -> list[transforms.RandomResizedCrop]:
    """The RandomResizedCrop steps of a composed transform."""
    return [t for t in compose.transforms if isinstance(t, transforms.RandomResizedCrop)]


@pytest.mark.parametrize("low,high", [(0.2, 1.0), (0.14, 1.0), (0.05, 0.14)])
def test_crop_area_fraction_matches_the_scale_range(low: float, high: float) -> None:
    if (low, high) == (0.2, 1.0):
        compose = moco_transform(MEAN, STD)
    else:
        crops = multicrop_transforms(MEAN, STD, ViewSpec(**SWAV_CIFAR))
        compose = crops[0] if high == 1.0 else crops[-1]
    (crop,) = random_resized_crops(compose)
    assert compose.transforms[0] is crop  # the crop comes before the photometric chain
    source = torch.zeros(3, 32, 32)
    torch.manual_seed(0)
    areas = []
    for _ in range(3000):
        _, _, height, width = crop.get_params(source, crop.scale, crop.ratio)
        areas.append(height * width / (32 * 32))
    areas = np.array(areas)
    # Integer crop sides shift single areas a little; rejected draws (too wide) make whole-image crops.
    inside = (areas >= low * 0.8) & (areas <= high + 1e-9)
    assert inside.mean() > 0.97
    assert abs(areas.mean() - (low + high) / 2) < 0.07 * (high - low) + 0.01


def test_multicrop_option_errors_are_user_errors() -> None:
    with pytest.raises(UserError):
        multicrop_transforms(MEAN, STD, ViewSpec([2, 6], [32], [0.14, 0.05], [1.0, 0.14]))
    with pytest.raises(UserError):
        multicrop_transforms(MEAN, STD, ViewSpec([2], [32], [0.5], [0.2]))
    with pytest.raises(UserError):
        multicrop_transforms(MEAN, STD, ViewSpec([0], [32], [0.14], [1.0]))


def identity_crops() -> list[transforms.Compose]:
    """Deterministic crops of two sizes, so every row can be recomputed from its image."""
    return [
        transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
        transforms.Compose([transforms.Resize(16), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
    ]


def tiny_setup(images: np.ndarray, sizes: list[int], ratio: float = 1.0, steps: int = 3, seed: int = 0):
    """A schedule over a disjoint partition of `images` among len(sizes) clients."""
    order = np.random.default_rng(seed).permutation(images.shape[0])
    shards = [np.sort(shard) for shard in np.array_split(order, len(sizes))]
    return FederatedSchedule(shards, sizes, ratio, steps_per_epoch=steps, seed=seed)


def test_torch_loader_rows_are_crop_major_and_grouped_by_client() -> None:
    images = synthetic_images(40)
    labels = np.arange(40) % 10
    schedule = tiny_setup(images, sizes=[2, 5, 3], steps=3)
    crops = identity_crops()
    loaders = build_torch_loaders(images, labels, images[:8], labels[:8], MEAN, STD, schedule, crops)
    assert loaders.backend == "torch" and loaders.num_classes == 10 and loaders.train.steps_per_epoch == 3
    batches = list(loaders.train.epoch(1))
    assert len(batches) == 3
    for step, batch in enumerate(batches):
        plan = schedule.step_plan(1, step)
        assert batch.client_ids == [client for client, _, _ in plan] == loaders.train.pool(1)
        assert batch.rows_per_client == [2, 5, 3]
        expected_indices = np.concatenate([indices for _, indices, _ in plan])
        np.testing.assert_array_equal(batch.sample_indices.numpy(), expected_indices)
        assert [tuple(crop.shape) for crop in batch.crops] == [(10, 3, 32, 32), (10, 3, 16, 16)]
        for crop_number, crop in enumerate(batch.crops):
            for row, index in enumerate(expected_indices):
                expected = crops[crop_number](transforms.functional.to_pil_image(images[index]))
                torch.testing.assert_close(crop[row], expected)


def test_torch_loader_same_batches_with_and_without_workers(real_images: np.ndarray) -> None:
    images = real_images[:60]
    labels = np.zeros(60, dtype=np.int64)
    schedule = tiny_setup(images, sizes=[4, 3, 5, 4], ratio=0.5, steps=2, seed=3)
    crops = multicrop_transforms(MEAN, STD, ViewSpec(nmb_crops=[2, 1], size_crops=[32, 16],
                                                     min_scale_crops=[0.14, 0.05], max_scale_crops=[1.0, 0.14]))
    results = []
    for workers in (0, 2):
        loaders = build_torch_loaders(images, labels, images, labels, MEAN, STD, schedule, crops, num_workers=workers)
        results.append([batch for epoch in (0, 1) for batch in loaders.train.epoch(epoch)])
    assert len(results[0]) == len(results[1]) == 4
    for in_process, in_workers in zip(*results, strict=True):
        assert in_process.client_ids == in_workers.client_ids
        assert torch.equal(in_process.sample_indices, in_workers.sample_indices)
        assert all(torch.equal(a, b) for a, b in zip(in_process.crops, in_workers.crops, strict=True))


def test_an_undecodable_image_read_in_a_worker_is_one_line_naming_it(tmp_path: Path) -> None:
    paths = [tmp_path / f"{index}.jpg" for index in range(4)]
    for path in paths:
        path.write_bytes(b"not an image")
    images = ImageFiles(paths, 16)
    labels = np.zeros(4, dtype=np.int64)
    schedule = FederatedSchedule([np.arange(4)], [2], 1.0, steps_per_epoch=1, seed=0)
    loaders = build_torch_loaders(images, labels, images, labels, MEAN, STD, schedule,
                                  [moco_transform(MEAN, STD, size=8)], num_workers=2)
    with pytest.raises(UserError, match=r"^cannot decode .*\d.jpg \(") as error:
        list(loaders.train.epoch(0))
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)


def test_torch_loader_resumes_mid_epoch_and_shards_clients() -> None:
    images = synthetic_images(50, seed=1)
    labels = np.zeros(50, dtype=np.int64)
    schedule = tiny_setup(images, sizes=[3, 4, 2, 5], steps=4, seed=2)
    loaders = build_torch_loaders(images, labels, images, labels, MEAN, STD, schedule, [moco_transform(MEAN, STD)] * 2)
    full = list(loaders.train.epoch(2))
    resumed = list(loaders.train.epoch(2, start_step=2))
    assert len(resumed) == 2
    for expected, got in zip(full[2:], resumed, strict=True):
        assert torch.equal(expected.sample_indices, got.sample_indices)
        assert all(torch.equal(a, b) for a, b in zip(expected.crops, got.crops, strict=True))
    shard = list(loaders.train.epoch(2, clients=[3, 1]))
    for expected, got in zip(full, shard, strict=True):
        assert got.client_ids == [1, 3] and got.rows_per_client == [4, 5]
        # Pool rows: client 0 -> 0:3, client 1 -> 3:7, client 2 -> 7:9, client 3 -> 9:14.
        for expected_crop, got_crop in zip(expected.crops, got.crops, strict=True):
            assert torch.equal(got_crop, torch.cat([expected_crop[3:7], expected_crop[9:14]]))
        assert torch.equal(got.sample_indices, torch.cat([expected.sample_indices[3:7], expected.sample_indices[9:14]]))
    assert list(loaders.train.epoch(2, start_step=4)) == []


def test_memory_and_test_loaders_cover_every_image_in_order(real_images: np.ndarray) -> None:
    images = real_images[:70]
    labels = np.arange(70, dtype=np.int64) % 10
    test_images, test_labels = real_images[70:95], (np.arange(25, dtype=np.int64) * 3) % 10
    schedule = tiny_setup(images, sizes=[4, 4])
    loaders = build_torch_loaders(images, labels, test_images, test_labels, MEAN, STD, schedule,
                                  [moco_transform(MEAN, STD)] * 2, eval_batch_size=16)
    normalise = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    for loader, source, source_labels in ((loaders.memory, images, labels), (loaders.test, test_images, test_labels)):
        for _ in range(2):
            batches = list(loader)
            assert all(x.shape[0] <= 16 for x, _ in batches)
            got = torch.cat([x for x, _ in batches])
            expected = torch.stack([normalise(transforms.functional.to_pil_image(image)) for image in source])
            torch.testing.assert_close(got, expected)
            np.testing.assert_array_equal(torch.cat([y for _, y in batches]).numpy(), source_labels)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_gaussian_blur_matches_torchvision(real_images: np.ndarray, kernel_size: int) -> None:
    ours = GaussianBlur(kernel_size, (0.1, 2.0))
    reference = transforms.GaussianBlur(kernel_size=kernel_size, sigma=(0.1, 2.0))
    differing, changed_images = 0, 0
    for index in range(40):
        image = transforms.functional.to_pil_image(real_images[index])
        torch.manual_seed(index)
        blurred = np.asarray(ours(image), dtype=np.int64)
        torch.manual_seed(index)
        expected = np.asarray(reference(image), dtype=np.int64)
        # Separable float sums may round a pixel that sits on .5 the other way.
        assert np.abs(blurred - expected).max() <= 1
        differing += int((blurred != expected).sum())
        changed_images += int(not np.array_equal(blurred, np.asarray(image)))
    assert changed_images > 30  # only sigma near 0.1 leaves an image as it was
    assert differing < 0.001 * 40 * 32 * 32 * 3
