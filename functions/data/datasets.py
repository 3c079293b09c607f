"""The dataset registry: one entry per dataset, read by the options, both data paths, the partition and the loop.

An entry says how to read the dataset (its reader), what it holds (classes, image size, splits) and how to look at
it (normalisation, the default crop sizes of the views, the blur). Adding a dataset is one reader and one
`register_dataset(DatasetEntry(...))`; `--dataset` then offers it, and both data paths make its views.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from functions.core.errors import UserError
from functions.data import cifar, readers
from functions.data.image_folder import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, read_image_folder, read_imagenet12
from functions.data.readers import UNLABELLED

# Set to 1 (or any non-empty value other than 0) to never download a dataset: a missing folder is then an error at once.
NO_DOWNLOAD_ENV = "SFL_NO_DOWNLOAD"
SYNTHETIC_SIZE = 32


@dataclass
class ImageDataset:
    """A labelled image dataset held in memory: uint8 NHWC images, int64 labels, normalisation constants."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    # The whole training set when --data_proportion trains on a part of it (train_images, train_labels are then
    # that part): the kNN memory and the probes still use all of it, as in MocoSFL.
    full_train: tuple[Any, np.ndarray] | None = None

    @property
    def memory_split(self) -> tuple[np.ndarray, np.ndarray]:
        """The labelled training images and their labels: the kNN monitor's memory and the probes' training set
        (every training image, also with --data_proportion, unless the dataset trains on unlabelled ones too)."""
        images, labels = self.full_train if self.full_train is not None else (self.train_images, self.train_labels)
        labelled = labels != UNLABELLED
        if labelled.all():
            return images, labels
        return images[labelled], labels[labelled]

    @property
    def has_unlabelled(self) -> bool:
        """Whether some training images have no label (UNLABELLED)."""
        return bool((self.train_labels == UNLABELLED).any())


# A reader: (data_dir, download=..., seed=..., **options) -> (train images, train labels, test images, test labels,
# source) as uint8 NHWC and int64 arrays; source says where the images came from (a folder, "synthetic").
Reader = Callable[..., tuple[Any, ...]]


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset.

    mean/std None: computed from the training images (the registered datasets carry MocoSFL's constants).
    crop_sizes: (global, local) sizes of the default views (MoCo's two views use the global size; SwAV's
    --size_crops defaults to both). blur_kernel_size 0: the views' Gaussian blur is MocoSFL's, PIL's radius blur
    whose extent follows the drawn sigma; an odd side instead blurs with a fixed kernel of that many pixels.
    """

    name: str
    read: Reader
    num_classes: int
    image_size: int
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    crop_sizes: tuple[int, int]
    blur_kernel_size: int = 0
    splits: tuple[str, ...] = ("train", "test")
    sized_by_data_size: bool = False  # image folders: --data_size sets the size, the views scale with it


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    """Make a dataset known to --dataset by its name (a later registration of the name replaces it)."""
    DATASETS[entry.name] = entry
    return entry


def dataset_names() -> list[str]:
    """Names of every registered dataset, in registration order."""
    return list(DATASETS)


def dataset_entry(name: str) -> DatasetEntry:
    """The entry registered as `name`; a UserError naming the choices otherwise."""
    entry = DATASETS.get(name)
    if entry is None:
        raise UserError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    return entry


def resolved_entry(name: str, data_size: int | None = None) -> DatasetEntry:
    """The entry of a dataset at the size a run reads it: for image folders --data_size (default 224), with the
    views' crops (global, local = 96/224 of it) scaled to it; other datasets have one size."""
    entry = dataset_entry(name)
    if not entry.sized_by_data_size:
        return entry
    size = entry.image_size if data_size is None else int(data_size)
    if size < 1:
        raise UserError(f"--data_size must be at least 1 pixel (got {size})")
    return replace(entry, image_size=size, crop_sizes=(size, max(1, round(size * 96 / 224))))


def download_allowed() -> bool:
    """Whether a missing dataset may be downloaded (not when SFL_NO_DOWNLOAD is set, e.g. offline clusters)."""
    return os.environ.get(NO_DOWNLOAD_ENV, "").strip() in ("", "0")


def stratified_subset(labels: np.ndarray, proportion: float, seed: int) -> np.ndarray:
    """Sorted indices keeping about `proportion` of every class (at least one image of each class present)."""
    rng = np.random.default_rng(seed)
    kept = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, int(round(proportion * members.size)))
        kept.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(kept)).astype(np.int64)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, float, float],
                                                                  tuple[float, float, float]]:
    """Per-channel mean and std of uint8 NHWC images in [0, 1] units (summed in chunks: no float copy of a large
    dataset)."""
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        total += block.sum(axis=0)
        squares += (block * block).sum(axis=0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return (float(mean[0]), float(mean[1]), float(mean[2])), (float(std[0]), float(std[1]), float(std[2]))


def load_dataset(name: str, data_dir: str | os.PathLike, *, download: bool = True, data_proportion: float = 1.0,
                 seed: int = 0, data_size: int | None = None, **reader_options: Any) -> ImageDataset:
    """Read a registered dataset (downloading if allowed and needed); optionally keep a stratified part of train."""
    entry = resolved_entry(name, data_size)
    if entry.sized_by_data_size:
        reader_options["data_size"] = entry.image_size
    if not 0.0 < data_proportion <= 1.0:
        raise UserError(f"--data_proportion must be in (0, 1], got {data_proportion}")
    train_images, train_labels, test_images, test_labels, source = entry.read(
        Path(data_dir), download=download, seed=seed, **reader_options)
    if train_images.shape[1:3] != (entry.image_size, entry.image_size):
        raise UserError(f"{name} images in {source} are {train_images.shape[1]}x{train_images.shape[2]} pixels, "
                        f"the dataset's are {entry.image_size}x{entry.image_size}; check --data_dir")
    if entry.mean is not None and entry.std is not None:
        mean, std = entry.mean, entry.std
    else:
        mean, std = channel_stats(train_images)
    full_train = None
    if data_proportion < 1.0:
        full_train = (train_images, train_labels)
        keep = stratified_subset(train_labels, data_proportion, seed)
        train_images = train_images.subset(keep) if isinstance(train_images, ImageFiles) else np.ascontiguousarray(
            train_images[keep])
        train_labels = train_labels[keep]
    # An image folder's classes are its train folder's subfolders.
    num_classes = entry.num_classes or int(train_labels.max()) + 1
    return ImageDataset(name=name, train_images=train_images, train_labels=train_labels, test_images=test_images,
                        test_labels=test_labels, num_classes=num_classes, mean=mean, std=std, source=source,
                        full_train=full_train)


def make_synthetic(num_train: int, num_test: int, seed: int, num_classes: int = 10) -> tuple[np.ndarray, ...]:
    """Random 32x32 images whose class sets a base colour and a stripe orientation, plus noise; deterministic."""
    rng = np.random.default_rng(seed)
    palette = rng.uniform(40, 215, size=(num_classes, 3))
    # Stripes keep classes apart even when colour augmentation (jitter, grayscale) removes the colour cue.
    coords = np.arange(SYNTHETIC_SIZE, dtype=np.float64)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    patterns = np.stack([
        np.sin(2 * np.pi * (2 + c % 3) / SYNTHETIC_SIZE
               * (xx * np.cos(np.pi * c / num_classes) + yy * np.sin(np.pi * c / num_classes)))
        for c in range(num_classes)
    ])

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(count) % num_classes).astype(np.int64)
        noise = rng.normal(0.0, 12.0, size=(count, SYNTHETIC_SIZE, SYNTHETIC_SIZE, 3))
        images = palette[labels][:, None, None, :] + 35.0 * patterns[labels][..., None] + noise
        return np.ascontiguousarray(np.clip(np.rint(images), 0, 255).astype(np.uint8)), labels

    train_images, train_labels = draw(num_train)
    test_images, test_labels = draw(num_test)
    return train_images, train_labels, test_images, test_labels


def read_synthetic(data_dir: Path, *, download: bool = True, seed: int = 0, synthetic_train: int = 512,
                   synthetic_test: int = 128) -> tuple[Any, ...]:
    """The synthetic dataset (no files): `synthetic_train` and `synthetic_test` images drawn from the seed."""
    if synthetic_train < 1 or synthetic_test < 1:
        raise UserError(f"synthetic data needs at least one train and one test image, "
                        f"got {synthetic_train} and {synthetic_test}")
    return (*make_synthetic(synthetic_train, synthetic_test, seed), "synthetic")


def _cifar_reader(name: str) -> Reader:
    """The reader of one CIFAR variant (its files are looked up when it runs)."""
    def read(data_dir: Path, *, download: bool = True, seed: int = 0) -> tuple[Any, ...]:
        return cifar.read_cifar(name, data_dir, download=download)

    return read


# MocoSFL's normalisation constants (its datasets.py); for STL-10 those its pair loader uses (CIFAR-10's).
SVHN_MEAN, SVHN_STD = (0.3522, 0.4004, 0.4463), (0.1189, 0.1377, 0.1784)
TINY_IMAGENET_MEAN, TINY_IMAGENET_STD = (0.5141, 0.5775, 0.3985), (0.2927, 0.2570, 0.1434)
STL10_MEAN, STL10_STD = cifar.CIFAR_SPECS["cifar10"].mean, cifar.CIFAR_SPECS["cifar10"].std

for _name, _spec in cifar.CIFAR_SPECS.items():
    register_dataset(DatasetEntry(name=_name, read=_cifar_reader(_name), num_classes=_spec.num_classes,
                                  image_size=cifar.IMAGE_SIZE, mean=_spec.mean, std=_spec.std, crop_sizes=(32, 16)))
register_dataset(DatasetEntry(name="synthetic", read=read_synthetic, num_classes=10, image_size=SYNTHETIC_SIZE,
                              mean=None, std=None, crop_sizes=(32, 16)))
register_dataset(DatasetEntry(name="stl10", read=readers.read_stl10, num_classes=10, image_size=readers.STL10_SIZE,
                              mean=STL10_MEAN, std=STL10_STD, crop_sizes=(96, 48)))
# Self-supervised training on STL-10's 100,000 unlabelled images as well; only an IID split is defined for them.
register_dataset(DatasetEntry(name="stl10_unlabelled", read=partial(readers.read_stl10, with_unlabelled=True),
                              num_classes=10, image_size=readers.STL10_SIZE, mean=STL10_MEAN, std=STL10_STD,
                              crop_sizes=(96, 48), splits=("train", "unlabeled", "test")))
register_dataset(DatasetEntry(name="svhn", read=readers.read_svhn, num_classes=10, image_size=32, mean=SVHN_MEAN,
                              std=SVHN_STD, crop_sizes=(32, 16)))
register_dataset(DatasetEntry(name="svhn_extra", read=partial(readers.read_svhn, with_extra=True), num_classes=10,
                              image_size=32, mean=SVHN_MEAN, std=SVHN_STD, crop_sizes=(32, 16),
                              splits=("train", "extra", "test")))
register_dataset(DatasetEntry(name="tinyimagenet", read=readers.read_tiny_imagenet, num_classes=200,
                              image_size=readers.TINY_SIZE, mean=TINY_IMAGENET_MEAN, std=TINY_IMAGENET_STD,
                              crop_sizes=(64, 32), splits=("train", "val")))
# Any train/<class>/ + val/<class>/ tree (ImageNet-12, ImageNet-100, DomainNet domains): decoded in the data path,
# resized to --data_size; classes from the folder (num_classes 0 = "the folder says").
register_dataset(DatasetEntry(name="imagefolder", read=read_image_folder, num_classes=0, image_size=224,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_sizes=(224, 96),
                              splits=("train", "val"), sized_by_data_size=True))
# MocoSFL's --dataset imagenet12 (Table 3): its 12-class ImageNet folder, read at 224 px like MocoSFL.
register_dataset(DatasetEntry(name="imagenet12", read=read_imagenet12, num_classes=12, image_size=224,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_sizes=(224, 96), splits=("train", "val")))
