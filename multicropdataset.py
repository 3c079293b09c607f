"""The torch/torchvision data path: MoCo v2 two-view and SwAV multi-crop augmentation, per sample.

Every sample is augmented from its own 64-bit key (see functions.data.loaders.FederatedSchedule), so a
client sees the same views whatever the number of worker processes or ranks.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms

from functions.core.errors import UserError
from functions.data.loaders import (
    FederatedLoaders,
    FederatedSchedule,
    NormalisedImageLoader,
    StepBatch,
    check_image_array,
    check_mean_std,
    worker_user_error,
)
from functions.data.views import BLUR_SIGMA, SIGMA_FOLLOWING_BLUR, ViewSpec

CropTransform = Callable[[Image.Image], torch.Tensor]


class RadiusGaussianBlur:
    """MocoSFL's Gaussian blur: sigma drawn uniformly per call from Python's `random` (as MocoSFL draws it), then
    PIL's GaussianBlur(radius=sigma); PIL in and out.

    PIL approximates the Gaussian by three box blurs of a fractional radius chosen so that their variance is
    sigma^2, edges repeated, rounded to 8 bits after each pass: its extent grows with sigma (13 pixels wide at
    sigma 2), unlike a fixed 3x3 kernel, which at sigma 2 changes a CIFAR-10 image about half as much.
    """

    def __init__(self, sigma: tuple[float, float] = BLUR_SIGMA) -> None:
        if not (0.0 < sigma[0] <= sigma[1]):
            raise ValueError(f"sigma range must satisfy 0 < min <= max, got {sigma}")
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, image: Image.Image) -> Image.Image:
        """The blurred image."""
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


class GaussianBlur:
    """Gaussian blur with a `kernel_size` kernel and reflect padding, sigma drawn uniformly per call; PIL in and out.

    Same result as torchvision's GaussianBlur(kernel_size, sigma) (it draws sigma from the torch generator the
    same way), computed separably in numpy: on small images the tensor round trip dominated the cost.
    """

    def __init__(self, kernel_size: int = 3, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel size must be odd and positive, got {kernel_size}")
        if not (0.0 < sigma[0] <= sigma[1]):
            raise ValueError(f"sigma range must satisfy 0 < min <= max, got {sigma}")
        self.radius = kernel_size // 2
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def _blur_axis(self, padded: np.ndarray, weights: list[float], axis: int) -> np.ndarray:
        """One separable pass along `axis` of an image padded by the radius on that axis."""
        radius = self.radius
        length = padded.shape[axis] - 2 * radius

        def shifted(offset: int) -> np.ndarray:
            return np.take(padded, np.arange(radius + offset, radius + offset + length), axis=axis)

        # Symmetric pairs first, outermost first, then the centre: for a 3x3 kernel edge * (a + c) + centre * b.
        total = weights[radius] * (shifted(-radius) + shifted(radius))
        for offset in range(radius - 1, 0, -1):
            total = total + weights[offset] * (shifted(-offset) + shifted(offset))
        return total + weights[0] * shifted(0)

    def __call__(self, image: Image.Image) -> Image.Image:
        """The blurred image."""
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        unnormalised = [math.exp(-0.5 * offset**2 / sigma**2) for offset in range(self.radius + 1)]
        norm = 1.0 + 2.0 * sum(unnormalised[1:])
        weights = [value / norm for value in unnormalised]
        pixels = np.asarray(image, dtype=np.float32)
        pad = self.radius
        spatial_pad = ((pad, pad), (pad, pad)) + ((0, 0),) * (pixels.ndim - 2)
        padded = np.pad(pixels, spatial_pad, mode="reflect")
        across = self._blur_axis(padded, weights, axis=1)
        blurred = self._blur_axis(across, weights, axis=0)
        return Image.fromarray(np.clip(np.round(blurred), 0, 255).astype(np.uint8))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel_size={2 * self.radius + 1}, sigma={self.sigma})"


def _colour_chain(mean: Sequence[float], std: Sequence[float], blur_kernel_size: int,
                  blur_probability: float = 0.5) -> list[Callable]:
    """The MoCo v2 photometric chain after the crop: jitter, grayscale, blur, flip, tensor, normalise (MocoSFL's
    mocov2 pair loader, in its order: with the same seeds it draws the same random numbers)."""
    blur: Callable = (RadiusGaussianBlur(BLUR_SIGMA) if int(blur_kernel_size) == SIGMA_FOLLOWING_BLUR
                      else GaussianBlur(int(blur_kernel_size), sigma=BLUR_SIGMA))
    return [
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([blur], p=blur_probability),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std]),
    ]


def moco_transform(mean: Sequence[float], std: Sequence[float], size: int = 32,
                   blur_kernel_size: int = SIGMA_FOLLOWING_BLUR) -> transforms.Compose:
    """One MoCo v2 view: random resized crop (scale 0.2-1), colour jitter, grayscale, blur, flip, normalise."""
    check_mean_std(mean, std)
    if size < 1:
        raise UserError(f"crop size must be at least 1 pixel, got {size}")
    return transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.2, 1.0))]
                              + _colour_chain(mean, std, blur_kernel_size))


def multicrop_transforms(mean: Sequence[float], std: Sequence[float], view_spec: ViewSpec) -> list[transforms.Compose]:
    """One transform per crop of the view spec, crop-major: RandomResizedCrop of its size and scale, then the chain."""
    check_mean_std(mean, std)
    crop_list: list[transforms.Compose] = []
    for count, size, low, high in zip(view_spec.nmb_crops, view_spec.size_crops, view_spec.min_scale_crops,
                                      view_spec.max_scale_crops):
        crop = transforms.Compose([transforms.RandomResizedCrop(int(size), scale=(float(low), float(high)))]
                                  + _colour_chain(mean, std, view_spec.blur_kernel_size, view_spec.blur_probability))
        crop_list.extend([crop] * int(count))
    return crop_list


class FederatedViewsDataset(Dataset):
    """uint8 images and one transform per crop; item (index, sample_key) gives that sample's crops in order."""

    def __init__(self, images: np.ndarray, crop_transforms: Sequence[CropTransform]) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(crop_transforms) == 0:
            raise ValueError("at least one crop transform is needed")
        self.images = images
        self.crop_transforms = list(crop_transforms)

    def __len__(self) -> int:
        """Number of source images."""
        return int(self.images.shape[0])

    def __getitem__(self, item: tuple[int, int]) -> list[torch.Tensor]:
        """The crops of image `index`, augmented from the random state seeded by `sample_key`."""
        index, sample_key = item
        image = Image.fromarray(self.images[int(index)])
        # Seeding per sample (not per worker) is what makes the views independent of worker count. The global
        # states are restored afterwards: with --num_workers 0 they are the training process's own.
        python_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(sample_key))
                random.seed(int(sample_key))
                return [crop_transform(image) for crop_transform in self.crop_transforms]
        finally:
            random.setstate(python_state)


def collate_crops(samples: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Stack a step's samples crop by crop: crop k becomes one (rows, 3, H_k, W_k) tensor in sample order."""
    num_crops = len(samples[0])
    # default_collate stacks into shared memory inside workers, saving a copy on the way back.
    return [default_collate([sample[crop] for sample in samples]) for crop in range(num_crops)]


class _StepSampler:
    """Batch sampler: per step, the (index, key) pairs of all planned clients, client-major."""

    def __init__(self, plans: list[list[tuple[int, np.ndarray, np.ndarray]]]) -> None:
        self.plans = plans

    def __len__(self) -> int:
        """Number of steps."""
        return len(self.plans)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """One flat list of (dataset index, sample key) per step."""
        for plan in self.plans:
            yield [
                (int(index), int(key))
                for _, indices, keys in plan
                for index, key in zip(indices.tolist(), keys.tolist())
            ]


class TorchTrainLoader:
    """Training batches of a federated schedule, augmented by torchvision in DataLoader workers."""

    def __init__(
        self,
        dataset: FederatedViewsDataset,
        schedule: FederatedSchedule,
        *,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        device: torch.device | None = None,
    ) -> None:
        if num_workers < 0:
            raise UserError(f"--num_workers must be non-negative, got {num_workers}")
        self.dataset = dataset
        self.schedule = schedule
        self.steps_per_epoch = schedule.steps_per_epoch
        self.num_workers = int(num_workers)
        self.prefetch_factor = int(prefetch_factor)
        self.device = torch.device(device) if device is not None else None

    def pool(self, epoch: int) -> list[int]:
        """Clients sampled for `epoch`, ascending."""
        return self.schedule.pool(epoch)

    def epoch(self, epoch: int, start_step: int = 0, clients: Sequence[int] | None = None) -> Iterator[StepBatch]:
        """Step batches of `epoch` from `start_step` to the end, for the pool or the given subset of it."""
        if not (0 <= start_step <= self.steps_per_epoch):
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        # Plans are small (indices and keys only); computing them up front lets the sampler and the
        # StepBatch metadata read the same list.
        plans = [self.schedule.step_plan(epoch, step, clients) for step in range(start_step, self.steps_per_epoch)]
        if not plans:
            return iter(())
        on_cuda = self.device is not None and self.device.type == "cuda"
        loader = DataLoader(
            self.dataset,
            batch_sampler=_StepSampler(plans),
            collate_fn=collate_crops,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            pin_memory=on_cuda,
        )
        return self._batches(plans, loader)

    def _batches(
        self, plans: list[list[tuple[int, np.ndarray, np.ndarray]]], loader: DataLoader
    ) -> Iterator[StepBatch]:
        """Pair each collated step with its plan's client layout; move it to the device when one is set."""
        try:
            for plan, crops in zip(plans, loader):
                yield self._step_batch(plan, crops)
        except UserError as error:
            raise worker_user_error(error) from None

    def _step_batch(self, plan: list[tuple[int, np.ndarray, np.ndarray]], crops: list[torch.Tensor]) -> StepBatch:
        """One collated step with its plan's client layout, on the device when one is set."""
        batch = StepBatch(
            crops=crops,
            client_ids=[client for client, _, _ in plan],
            rows_per_client=[len(indices) for _, indices, _ in plan],
            sample_indices=torch.from_numpy(np.concatenate([indices for _, indices, _ in plan])),
        )
        return batch.to(self.device) if self.device is not None else batch


def build_torch_loaders(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    schedule: FederatedSchedule,
    crop_transforms: Sequence[CropTransform],
    *,
    eval_batch_size: int = 512,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    device: torch.device | None = None,
    num_classes: int | None = None,
    memory: tuple[np.ndarray, np.ndarray] | None = None,
) -> FederatedLoaders:
    """Training loader over the schedule plus memory (un-augmented; the labelled training images given as `memory`,
    else all of them) and test loaders, torchvision backend."""
    check_image_array(train_images, train_labels, "train")
    check_image_array(test_images, test_labels, "test")
    check_mean_std(mean, std)
    largest_index = max(int(shard.max()) for shard in schedule.client_indices)
    if largest_index >= train_images.shape[0]:
        raise ValueError(f"the partition refers to index {largest_index}, but there are {train_images.shape[0]} images")
    if num_classes is None:
        num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    device = torch.device(device) if device is not None else None
    train = TorchTrainLoader(
        FederatedViewsDataset(train_images, crop_transforms),
        schedule,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        device=device,
    )
    return FederatedLoaders(
        train=train,
        memory=NormalisedImageLoader(*(memory if memory is not None else (train_images, train_labels)), mean, std,
                                     eval_batch_size, device=device),
        test=NormalisedImageLoader(test_images, test_labels, mean, std, eval_batch_size, device=device),
        backend="torch",
        num_classes=num_classes,
    )
