"""Small copies of STL-10, SVHN and Tiny-ImageNet-200 in their official layouts (and CIFAR's rows), written by the
tests (no network)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from functions.data.cifar import ROW_LENGTH


def nhwc_to_rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's python-format rows of (N, 32, 32, 3) uint8 images: (N, 3072), planar R, G, B (rows_to_nhwc's inverse)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(-1, ROW_LENGTH), dtype=np.uint8)


def random_images(count: int, size: int, seed: int) -> np.ndarray:
    """uint8 NHWC images whose left half is brighter than their right half (a visible orientation)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 128, size=(count, size, size, 3), dtype=np.uint8)
    images[:, :, : size // 2] += 100
    return images


def write_stl10(data_dir: Path, train: int = 20, test: int = 10, unlabelled: int = 30) -> dict[str, np.ndarray]:
    """data_dir/stl10_binary/{train,test}_{X,y}.bin and unlabeled_X.bin; returns the images and 0-based labels."""
    folder = data_dir / "stl10_binary"
    folder.mkdir(parents=True)
    written: dict[str, np.ndarray] = {}
    for split, count, seed in (("train", train, 1), ("test", test, 2), ("unlabeled", unlabelled, 3)):
        images = random_images(count, 96, seed)
        # Official layout: per image, channel by channel, each channel column by column.
        images.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")
        written[f"{split}_images"] = images
        if split != "unlabeled":
            labels = np.arange(count) % 10
            (labels + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")  # stored 1..10
            written[f"{split}_labels"] = labels
    return written


def write_svhn(data_dir: Path, train: int = 20, test: int = 10, extra: int = 15) -> dict[str, np.ndarray]:
    """data_dir/{train,test,extra}_32x32.mat (X: 32x32x3xN, y: Nx1 with 10 for the digit 0)."""
    from scipy.io import savemat

    data_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, np.ndarray] = {}
    for split, count, seed in (("train", train, 4), ("test", test, 5), ("extra", extra, 6)):
        images = random_images(count, 32, seed)
        digits = np.arange(count) % 10
        stored = np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)
        savemat(data_dir / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": stored})
        written[f"{split}_images"], written[f"{split}_labels"] = images, digits
    return written


def write_tiny_imagenet(data_dir: Path, classes: int = 3, per_class: int = 4, val: int = 6) -> dict[str, np.ndarray]:
    """data_dir/tiny-imagenet-200 with wnids.txt, train/<wnid>/images/*.JPEG, val/images and val_annotations.txt."""
    from PIL import Image

    folder = data_dir / "tiny-imagenet-200"
    wnids = [f"n{index:08d}" for index in range(classes)]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # the file's order sets the class indices
    class_of = {wnid: index for index, wnid in enumerate(reversed(wnids))}
    train_images, train_labels = [], []
    for wnid in sorted(wnids, key=class_of.get):
        images = random_images(per_class, 64, 10 + class_of[wnid])
        (folder / "train" / wnid / "images").mkdir(parents=True)
        for index, image in enumerate(images):
            Image.fromarray(image).save(folder / "train" / wnid / "images" / f"{wnid}_{index}.JPEG", quality=100, subsampling=0)
        train_images.append(images)
        train_labels += [class_of[wnid]] * per_class
    val_images = random_images(val, 64, 99)
    lines = []
    for index, image in enumerate(val_images):
        Image.fromarray(image).save(folder / "val" / "images" / f"val_{index}.JPEG", quality=100, subsampling=0)
        lines.append(f"val_{index}.JPEG\t{wnids[index % classes]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {"train_images": np.concatenate(train_images), "train_labels": np.asarray(train_labels),
            "test_images": val_images, "test_labels": np.asarray([class_of[wnids[i % classes]] for i in range(val)])}
