"""Tests of the DALI data path: same contract, layout and augmentation semantics as the torch path, on CPU DALI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter
from torchvision import transforms

pytest.importorskip("nvidia.dali")


import pytest
from entry_runs import FAST, assert_clean_user_error, run_entry

import run_sflmoco
import run_sflswav
from Dali.get_dali_dataloader import (  # noqa: E402
    BLUR_PROBABILITY,
    BLUR_SIGMA,
    BRIGHTNESS,
    CONTRAST,
    CROP_RATIO,
    FLIP_PROBABILITY,
    GRAYSCALE_PROBABILITY,
    HUE,
    JITTER_PROBABILITY,
    SATURATION,
    CropParameters,
    DaliCropAugmenter,
    build_dali_loaders,
    colour_jitter_slots,
    crop_windows,
    draw_crop_parameters,
    resolve_dali_device,
    uniform_draws,
)
from functions.core.errors import (
    UserError,  # noqa: E402
    )
from functions.data.blur import pil_blur_float  # noqa: E402
from functions.data.datasets import ImageDataset, load_dataset  # noqa: E402
from functions.data.loaders import FederatedSchedule, normalise_uint8_images  # noqa: E402
from functions.data.views import ViewSpec  # noqa: E402
from multicropdataset import RadiusGaussianBlur, build_torch_loaders, moco_transform, multicrop_transforms  # noqa: E402

MOCO_VIEWS = ViewSpec(nmb_crops=(2,), size_crops=(32,), min_scale_crops=(0.2,), max_scale_crops=(1.0,))
SWAV_VIEWS = ViewSpec(nmb_crops=(2, 6), size_crops=(32, 16), min_scale_crops=(0.14, 0.05), max_scale_crops=(1.0, 0.14))
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def cifar_sample(cifar10_mini_dir: Path) -> ImageDataset:
    """The real CIFAR-10 sample (the fixture skips when it is absent)."""
    return load_dataset("cifar10", cifar10_mini_dir, download=False)


def synthetic_dataset(num_train: int = 96, seed: int = 0) -> ImageDataset:
    """A small synthetic dataset with the project's loader."""
    return load_dataset("synthetic", "unused", seed=seed, synthetic_train=num_train, synthetic_test=16)


def equal_shards(num_clients: int, shard_size: int, seed: int = 0) -> list[np.ndarray]:
    """Disjoint random shards of equal size over range(num_clients * shard_size)."""
    order = np.random.default_rng(seed).permutation(num_clients * shard_size)
    return [np.sort(order[c * shard_size:(c + 1) * shard_size]) for c in range(num_clients)]


def dali_loaders(dataset: ImageDataset, schedule: FederatedSchedule, views: ViewSpec, seed: int = 0):
    """DALI loaders on CPU DALI, outputs on the CPU."""
    return build_dali_loaders(dataset, schedule, views, device=CPU, dali_device="cpu", eval_batch_size=64,
                              num_threads=2, seed=seed)


def torch_loaders(dataset: ImageDataset, schedule: FederatedSchedule, views: ViewSpec):
    """The torchvision path on the same schedule and views."""
    crops = multicrop_transforms(dataset.mean, dataset.std, views)
    return build_torch_loaders(dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels,
                               dataset.mean, dataset.std, schedule, crops, eval_batch_size=64, num_workers=0)


def unnormalise(crops: torch.Tensor, mean, std) -> torch.Tensor:
    """Pixels in [0, 1] of normalised (B, 3, H, W) crops."""
    return crops * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


def grayscale_fraction(crops: torch.Tensor, mean, std) -> float:
    """Fraction of crops whose three un-normalised channels are equal."""
    pixels = unnormalise(crops, mean, std)
    spread = (pixels.amax(dim=1) - pixels.amin(dim=1)).flatten(1).amax(dim=1)
    return float((spread < 1e-4).float().mean())


def run_one(augmenter: DaliCropAugmenter, images: np.ndarray, parameters: list[CropParameters]) -> list[torch.Tensor]:
    """The crops of one batch."""
    [(tag, crops)] = list(augmenter.stream([(images, parameters, "only")]))
    assert tag == "only"
    return crops


def raw_augmenter(sizes: list[int], rows: int, blur_kernel_size: int = 0) -> DaliCropAugmenter:
    """An augmenter whose output is in 0-255 pixel units (mean 0, std 1/255)."""
    return DaliCropAugmenter(sizes, (0.0, 0.0, 0.0), (1 / 255,) * 3, max_batch_size=rows, dali_device="cpu",
                             output_device=CPU, num_threads=2, blur_kernel_size=blur_kernel_size)


def images_as_float(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC to float NCHW in 0-255 units."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


# ------------------------------------------------------------------------------------------ contract and layout
@pytest.mark.parametrize("views", [MOCO_VIEWS, SWAV_VIEWS], ids=["moco", "swav"])
def test_batches_have_the_torch_path_layout(cifar_sample: ImageDataset, views: ViewSpec) -> None:
    schedule = FederatedSchedule(equal_shards(3, 40), [4, 6, 5], 1.0, 3, seed=11)
    dali = dali_loaders(cifar_sample, schedule, views)
    reference = torch_loaders(cifar_sample, schedule, views)
    assert dali.backend == "dali" and dali.num_classes == 10 and dali.train.steps_per_epoch == 3
    mean, std = torch.tensor(cifar_sample.mean).view(1, 3, 1, 1), torch.tensor(cifar_sample.std).view(1, 3, 1, 1)
    low, high = (0 - mean) / std, (1 - mean) / std
    steps = 0
    for ours, theirs in zip(dali.train.epoch(0), reference.train.epoch(0)):
        steps += 1
        assert ours.client_ids == theirs.client_ids == [0, 1, 2]
        assert ours.rows_per_client == theirs.rows_per_client == [4, 6, 5]
        assert torch.equal(ours.sample_indices, theirs.sample_indices)
        assert [tuple(c.shape) for c in ours.crops] == [tuple(c.shape) for c in theirs.crops]
        sizes = [size for count, size in zip(views.nmb_crops, views.size_crops) for _ in range(count)]
        assert [crop.shape[-1] for crop in ours.crops] == sizes
        for crop in ours.crops:
            assert crop.dtype == torch.float32 and crop.device == CPU and crop.is_contiguous()
            assert bool((crop >= low - 1e-4).all() and (crop <= high + 1e-4).all())
        assert not torch.equal(ours.crops[0], ours.crops[1])  # two different views of the same images
    assert steps == 3


def test_each_client_reads_exactly_its_shard_once_per_pass() -> None:
    dataset = synthetic_dataset(60)
    shards = equal_shards(3, 20, seed=4)
    # Four steps: client 0 reads its shard once, client 1 reads 16 of its 20 samples, client 2 reads its shard twice.
    schedule = FederatedSchedule(shards, [5, 4, 10], 1.0, 4, seed=2)
    loaders = dali_loaders(dataset, schedule, MOCO_VIEWS)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for step, batch in enumerate(loaders.train.epoch(0)):
        plan = schedule.step_plan(0, step)
        assert torch.equal(batch.sample_indices, torch.from_numpy(np.concatenate([i for _, i, _ in plan])))
        for client, part in zip(batch.client_ids, batch.sample_indices.split(batch.rows_per_client)):
            seen[client].extend(part.tolist())
    assert sorted(seen[0]) == shards[0].tolist()
    assert len(seen[1]) == len(set(seen[1])) == 16 and set(seen[1]) <= set(shards[1].tolist())  # most of a pass
    assert sorted(seen[2][:20]) == sorted(seen[2][20:]) == shards[2].tolist()


def gray_chain(values: np.ndarray, parameters: CropParameters) -> np.ndarray:
    """What the jitter does to uniform gray images: every blend slot scales by its weight sum, then clips."""
    for slot in range(parameters.blend.shape[1]):
        values = np.clip(values * parameters.blend[:, slot].sum(axis=1), 0, 255)
    return values


def test_every_row_shows_its_own_image_with_its_own_parameters() -> None:
    # Uniform gray images: luma, mean luma, crop, hue, grayscale, blur and flip leave them unchanged, so each
    # crop's value is predicted by the row's image and the jitter parameters drawn from the row's key.
    levels = np.linspace(20, 235, 48)
    images = np.repeat(np.round(levels).astype(np.uint8)[:, None, None, None], 32, axis=1).repeat(32, 2).repeat(3, 3)
    dataset = ImageDataset("gray", images, np.arange(48) % 10, images[:4], np.arange(4), 10,
                           (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "test")
    schedule = FederatedSchedule(equal_shards(3, 16, seed=1), [4, 4, 4], 1.0, 4, seed=9)
    loaders = dali_loaders(dataset, schedule, SWAV_VIEWS, seed=9)
    for step, batch in enumerate(loaders.train.epoch(0)):
        keys = np.concatenate([k for _, _, k in schedule.step_plan(0, step)])
        source = images[batch.sample_indices.numpy(), 0, 0, 0].astype(np.float64)
        for crop_index, crop in enumerate(batch.crops):
            scale = (0.14, 1.0) if crop_index < 2 else (0.05, 0.14)
            parameters = draw_crop_parameters(keys, 9, crop_index, scale, (32, 32))
            expected = gray_chain(source, parameters) / 255.0
            pixels = unnormalise(crop, dataset.mean, dataset.std)
            assert torch.allclose(pixels, torch.from_numpy(expected).float().view(-1, 1, 1, 1).expand_as(pixels),
                                  atol=2e-4)


def test_views_do_not_depend_on_grouping_or_start_step(cifar_sample: ImageDataset) -> None:
    schedule = FederatedSchedule(equal_shards(3, 30), [4, 4, 4], 1.0, 3, seed=5)
    loader = dali_loaders(cifar_sample, schedule, SWAV_VIEWS).train
    full = list(loader.epoch(1))
    alone = list(loader.epoch(1, clients=[1]))
    resumed = list(loader.epoch(1, start_step=2))
    assert [b.client_ids for b in alone] == [[1]] * 3
    for whole, single in zip(full, alone):
        for crop, single_crop in zip(whole.crops, single.crops):
            assert torch.allclose(crop[4:8], single_crop, atol=1e-5)
    for crop, resumed_crop in zip(full[2].crops, resumed[0].crops):
        assert torch.allclose(crop, resumed_crop, atol=1e-5)


# ------------------------------------------------------------------------------------------ augmentation semantics
def test_constants_are_those_of_the_torch_path() -> None:
    chain = moco_transform((0.5,) * 3, (0.25,) * 3).transforms
    crop, jitter_apply, gray, blur_apply, flip = chain[0], chain[1], chain[2], chain[3], chain[4]
    assert crop.ratio == pytest.approx(CROP_RATIO)
    jitter = jitter_apply.transforms[0]
    assert jitter_apply.p == JITTER_PROBABILITY
    assert jitter.brightness == pytest.approx((1 - BRIGHTNESS, 1 + BRIGHTNESS))
    assert jitter.contrast == pytest.approx((1 - CONTRAST, 1 + CONTRAST))
    assert jitter.saturation == pytest.approx((1 - SATURATION, 1 + SATURATION))
    assert jitter.hue == pytest.approx((-HUE, HUE))
    assert gray.p == GRAYSCALE_PROBABILITY and blur_apply.p == BLUR_PROBABILITY and flip.p == FLIP_PROBABILITY
    assert isinstance(blur_apply.transforms[0], RadiusGaussianBlur) and blur_apply.transforms[0].sigma == BLUR_SIGMA


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.05, 0.14)])
def test_crop_windows_follow_torchvision_distribution(scale: tuple[float, float]) -> None:
    samples = 6000
    keys = np.arange(samples, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    top, left, height, width = crop_windows(uniform_draws(keys, 0, 0, 22), 32, 32, scale)
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 32).all() and (left + width <= 32).all()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = np.array([transforms.RandomResizedCrop.get_params(torch.empty(3, 32, 32), list(scale),
                                                                      list(CROP_RATIO)) for _ in range(samples)])
    ours = np.stack([top, left, height, width], axis=1)
    area, reference_area = height * width / 1024.0, reference[:, 2] * reference[:, 3] / 1024.0
    # Tolerances: 5 standard errors of a difference of two independent means.
    for statistic in (lambda w: w[:, 2] * w[:, 3] / 1024.0, lambda w: np.log(w[:, 3] / w[:, 2]),
                      lambda w: w[:, 0] + w[:, 2] / 2, lambda w: w[:, 1] + w[:, 3] / 2):
        a, b = statistic(ours), statistic(reference)
        assert abs(a.mean() - b.mean()) < 5 * math.sqrt((a.var() + b.var()) / samples)
    assert abs(np.quantile(area, 0.9) - np.quantile(reference_area, 0.9)) < 0.05


def test_crop_geometry_matches_torchvision_resized_crop(cifar_sample: ImageDataset) -> None:
    rows = 24
    images = cifar_sample.train_images[:rows]
    rng = np.random.default_rng(3)
    parameters = [CropParameters.identity(rows, 32, 32) for _ in range(2)]
    windows = []
    for crop in parameters:
        height, width = rng.integers(4, 33, rows), rng.integers(4, 33, rows)
        top, left = rng.integers(0, 33 - height), rng.integers(0, 33 - width)
        crop.anchor = np.stack([top, left], 1).astype(np.float32)
        crop.window = np.stack([height, width], 1).astype(np.float32)
        windows.append((top, left, height, width))
    crops = run_one(raw_augmenter([32, 12], rows), images, parameters)
    for crop, size, (top, left, height, width) in zip(crops, [32, 12], windows):
        expected = torch.stack([
            F.resized_crop(images_as_float(images[i:i + 1])[0], int(top[i]), int(left[i]), int(height[i]),
                           int(width[i]), [size, size], antialias=True)
            for i in range(rows)])
        assert crop.shape == (rows, 3, size, size)
        assert (crop - expected).abs().mean() < 0.5  # 0-255 units; the filters differ in detail only
        assert (crop - expected).abs().amax() < 12


def test_colour_jitter_matches_torchvision_in_every_order(cifar_sample: ImageDataset) -> None:
    rows = 48
    images = cifar_sample.train_images[100:100 + rows]
    rng = np.random.default_rng(7)
    factors = np.stack([rng.uniform(0.6, 1.4, rows), rng.uniform(0.6, 1.4, rows), rng.uniform(0.6, 1.4, rows),
                        rng.uniform(-0.1, 0.1, rows)], axis=1)
    factors[:3, 0] = 1.4  # strong brightening makes the clipping, hence the order, matter
    order = np.stack([rng.permutation(4) for _ in range(rows)])
    parameters = CropParameters.identity(rows, 32, 32)
    parameters.blend, parameters.hue_shift = colour_jitter_slots(factors, order)
    [crop] = run_one(raw_augmenter([32], rows), images, [parameters])
    operations = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    for row in range(rows):
        expected = images_as_float(images[row:row + 1])[0] / 255.0
        for op in order[row]:
            expected = operations[op](expected, float(factors[row, op]))
        assert torch.allclose(crop[row] / 255.0, expected, atol=2e-4), f"row {row}, order {order[row]}"


def test_grayscale_blur_and_flip_match_torchvision(cifar_sample: ImageDataset) -> None:
    rows = 16
    images = cifar_sample.train_images[200:200 + rows]
    sigma = np.linspace(0.1, 2.0, rows).astype(np.float32)
    plain, gray, blurred, flipped = (CropParameters.identity(rows, 32, 32) for _ in range(4))
    gray.grayscale[:] = True
    blurred.blur_sigma = sigma
    flipped.flip[:] = True
    outputs = run_one(raw_augmenter([32] * 4, rows), images, [plain, gray, blurred, flipped])
    source = images_as_float(images)
    assert torch.allclose(outputs[0], source, atol=1e-3)
    # torchvision weighs red by 0.2989 where PIL (and this path) use 0.299: up to 0.03 of a grey level apart.
    assert torch.allclose(outputs[1], F.rgb_to_grayscale(source, 3), atol=0.05)
    assert torch.equal(outputs[1][:, 0], outputs[1][:, 1]) and torch.equal(outputs[1][:, 1], outputs[1][:, 2])
    # PIL's blur (MocoSFL's) without its rounding to 8 bits after each of its six passes: the float reproduction
    # to float32 rounding, PIL itself within a grey level on average (measured 0.16-0.6, at most 2.8).
    reproduced = torch.stack([torch.from_numpy(pil_blur_float(images[i], float(sigma[i]))).permute(2, 0, 1)
                              for i in range(rows)]).float()
    assert torch.allclose(outputs[2], reproduced, atol=1e-3)
    pil = images_as_float(np.stack([np.asarray(Image.fromarray(images[i]).filter(
        ImageFilter.GaussianBlur(radius=float(sigma[i])))) for i in range(rows)]))
    assert (outputs[2] - pil).abs().mean() < 1.0 and (outputs[2] - pil).abs().max() <= 3.0
    assert torch.allclose(outputs[3], F.hflip(source), atol=1e-3)


def test_a_fixed_blur_window_is_torchvisions_gaussian(cifar_sample: ImageDataset) -> None:
    rows = 8
    images = cifar_sample.train_images[:rows]
    sigma = np.linspace(0.1, 2.0, rows).astype(np.float32)
    blurred = CropParameters.identity(rows, 32, 32)
    blurred.blur_sigma = sigma
    [output] = run_one(raw_augmenter([32], rows, blur_kernel_size=3), images, [blurred])
    source = images_as_float(images)
    expected = torch.stack([F.gaussian_blur(source[i], [3, 3], [float(sigma[i])] * 2) for i in range(rows)])
    assert torch.allclose(output, expected, atol=1e-3)


def test_augmentation_statistics_agree_with_the_torch_path(cifar_sample: ImageDataset) -> None:
    schedule = FederatedSchedule(equal_shards(4, 250), [250] * 4, 1.0, 1, seed=21)
    [ours] = list(dali_loaders(cifar_sample, schedule, MOCO_VIEWS).train.epoch(0))
    [theirs] = list(torch_loaders(cifar_sample, schedule, MOCO_VIEWS).train.epoch(0))
    mean, std = cifar_sample.mean, cifar_sample.std
    crops_ours, crops_theirs = torch.cat(ours.crops), torch.cat(theirs.crops)
    count = crops_ours.shape[0]  # 2000 crops from each path
    gray_ours, gray_theirs = grayscale_fraction(crops_ours, mean, std), grayscale_fraction(crops_theirs, mean, std)
    assert abs(gray_ours - GRAYSCALE_PROBABILITY) < 5 * math.sqrt(0.2 * 0.8 / count) + 0.01  # CIFAR has gray images
    assert abs(gray_ours - gray_theirs) < 4 * math.sqrt(2 * 0.2 * 0.8 / count)
    for name, statistic in (("brightness", lambda p: p.mean(dim=(1, 2, 3))),
                            ("contrast", lambda p: p.flatten(1).std(dim=1)),
                            ("colourfulness", lambda p: (p.amax(dim=1) - p.amin(dim=1)).mean(dim=(1, 2)))):
        a, b = statistic(unnormalise(crops_ours, mean, std)), statistic(unnormalise(crops_theirs, mean, std))
        bound = 5 * math.sqrt((a.var() + b.var()) / count)
        assert abs(a.mean() - b.mean()) < bound, f"{name}: {a.mean():.4f} vs {b.mean():.4f} (bound {bound:.4f})"


# ------------------------------------------------------------------------------------------ passes and seeds
def test_three_epochs_with_resets_and_an_abandoned_pass() -> None:
    dataset = synthetic_dataset(48)
    schedule = FederatedSchedule(equal_shards(2, 24), [4, 4], 1.0, 5, seed=1)
    train = dali_loaders(dataset, schedule, MOCO_VIEWS).train
    first_batches = []
    for epoch in range(3):
        batches = list(train.epoch(epoch))
        assert len(batches) == 5
        first_batches.append(batches[0])
        train.reset()
    assert not torch.equal(first_batches[0].crops[0], first_batches[1].crops[0])
    for _ in train.epoch(1):  # leave a pass after one step, with further steps prefetched
        break
    again = next(iter(train.epoch(1)))
    assert torch.equal(again.sample_indices, first_batches[1].sample_indices)
    assert torch.allclose(again.crops[0], first_batches[1].crops[0], atol=1e-5)
    assert list(train.epoch(0, start_step=5)) == []
    stale = train.epoch(2)
    fresh = train.epoch(2)
    with pytest.raises(RuntimeError, match="newer pass"):
        next(stale)
    assert len(list(fresh)) == 5


def test_same_seed_gives_the_same_first_batch_and_another_seed_differs() -> None:
    dataset = synthetic_dataset(48)

    def first_batch(seed: int):
        schedule = FederatedSchedule(equal_shards(2, 24), [6, 6], 1.0, 4, seed=seed)
        return next(iter(dali_loaders(dataset, schedule, SWAV_VIEWS, seed=seed).train.epoch(0)))

    one, same, other = first_batch(5), first_batch(5), first_batch(6)
    assert torch.equal(one.sample_indices, same.sample_indices)
    assert all(torch.equal(a, b) for a, b in zip(one.crops, same.crops))
    assert not all(torch.allclose(a, b) for a, b in zip(one.crops, other.crops))


def test_augmentation_draws_depend_on_seed_and_crop() -> None:
    keys = np.arange(1000, dtype=np.uint64)
    base = uniform_draws(keys, 0, 0, 8)
    assert base.shape == (1000, 8) and (base >= 0).all() and (base < 1).all()
    assert abs(base.mean() - 0.5) < 0.02
    assert np.array_equal(base, uniform_draws(keys, 0, 0, 8))
    assert not np.allclose(base, uniform_draws(keys, 1, 0, 8))
    assert not np.allclose(base, uniform_draws(keys, 0, 1, 8))
    assert np.array_equal(base[10:20], uniform_draws(keys[10:20], 0, 0, 8))  # per row, whatever the batch


def test_memory_and_test_loaders_are_the_plain_normalised_images() -> None:
    dataset = synthetic_dataset(40)
    schedule = FederatedSchedule(equal_shards(2, 20), [4, 4], 1.0, 2, seed=0)
    loaders = dali_loaders(dataset, schedule, MOCO_VIEWS)
    images, labels = zip(*loaders.memory)
    assert torch.allclose(torch.cat(images), normalise_uint8_images(torch.from_numpy(dataset.train_images),
                                                                    dataset.mean, dataset.std))
    assert torch.equal(torch.cat(labels), torch.from_numpy(dataset.train_labels))
    test_images, _ = zip(*loaders.test)
    assert torch.cat(test_images).shape == (16, 3, 32, 32)


# ------------------------------------------------------------------------------------------ user errors
def test_dali_device_choices() -> None:
    with pytest.raises(UserError, match="--dali_device"):
        resolve_dali_device("tpu")
    assert resolve_dali_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_dali_device(None) == "gpu"
    else:
        assert resolve_dali_device(None) == "cpu"
        with pytest.raises(UserError, match="CUDA"):
            resolve_dali_device("gpu")


def test_impossible_view_spec_is_a_user_error() -> None:
    dataset = synthetic_dataset(40)
    schedule = FederatedSchedule(equal_shards(2, 20), [4, 4], 1.0, 2, seed=0)
    with pytest.raises(UserError, match="same"):
        dali_loaders(dataset, schedule, ViewSpec((2, 6), (32,), (0.2,), (1.0,)))
    with pytest.raises(UserError, match="scales"):
        dali_loaders(dataset, schedule, ViewSpec((2,), (32,), (0.5,), (0.2,)))


# ------------------------------------------------------------------------------------------ entry scripts
def _entry_arguments(output_dir: Path) -> list[str]:
    return ["--dataset", "synthetic", "--width", "8", "--num_workers", "0", "--num_epoch", "1", "--max_steps", "3",
            "--skip_linear", "--eval_freq", "0", "--num_client", "3", "--batch_size", "8", "--use_dali",
            "--dali_device", "cpu", "--output_dir", str(output_dir)]


def test_sflmoco_entry_trains_with_dali(tmp_path: Path) -> None:

    run_sflmoco.main([*_entry_arguments(tmp_path / "moco"), "--K", "64", "--K_dim", "16"])
    metrics = json.loads((tmp_path / "moco" / "metrics.json").read_text())
    assert metrics["data_backend"] == "dali"
    assert [step for step, _ in metrics["train_loss"]] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss in metrics["train_loss"])


def test_sflswav_entry_trains_with_dali(tmp_path: Path) -> None:
    swav = pytest.importorskip("functions.methods.swav")
    if not hasattr(swav, "SwavServer"):
        pytest.skip("functions.methods.swav has no SwavServer yet")

    run_sflswav.main([*_entry_arguments(tmp_path / "swav"), "--nmb_prototypes", "12", "--feat_dim", "16",
                      "--hidden_mlp", "32"])
    metrics = json.loads((tmp_path / "swav" / "metrics.json").read_text())
    assert metrics["data_backend"] == "dali"
    assert [step for step, _ in metrics["train_loss"]] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss in metrics["train_loss"])


def test_use_dali_without_dali_exits_2(tmp_path):
    # A package named nvidia ahead of the installed one makes `import nvidia.dali` fail as on a machine without it.
    shadow = tmp_path / "shadow" / "nvidia"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'nvidia.dali'\")\n")
    result = run_entry("run_sflmoco.py", [*FAST, "--use_dali", "--output_dir", str(tmp_path / "run")],
                       PYTHONPATH=str(shadow.parent))
    assert_clean_user_error(result, "--use_dali needs NVIDIA DALI")
