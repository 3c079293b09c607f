"""Image-folder datasets (ImageNet subsets such as ImageNet-12 or ImageNet-100, DomainNet domains, any
``split/<class>/<image>`` tree), decoded in the data path instead of loaded whole.

`ImageFiles` stands where the in-memory datasets hold a uint8 NHWC array: it has the array's shape and dtype and
decodes (and resizes to ``--data_size``) only the images it is indexed with, so the torch loader's workers decode
their own batches, the DALI path reads the encoded bytes and decodes them itself, and memory stays that of the file
list.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from functions.core.errors import UserError
from functions.data.decoding import open_rgb, read_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
TRAIN_SPLITS = ("train",)
TEST_SPLITS = ("val", "test")
# ImageNet's channel statistics: computing them would decode every training image once.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFiles:
    """Image files seen as a read-only uint8 (N, size, size, 3) array: indexing decodes and resizes on demand."""

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths = [Path(path) for path in paths]
        self.size = int(size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int) -> np.ndarray:
        """One image, RGB, resized to size x size (bilinear, antialiased), uint8 HWC."""
        from PIL import Image

        image = open_rgb(self.paths[index])
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR, reducing_gap=None)
        return np.asarray(image, dtype=np.uint8)

    def encoded(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The files' bytes, for a decoder that reads them itself (DALI)."""
        return [read_bytes(self.paths[int(index)]) for index in indices]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)):
            return self.decode(int(key))
        if isinstance(key, slice):
            return self._stack(range(*key.indices(len(self.paths))))
        indices = np.asarray(key)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        return self._stack(indices.reshape(-1))

    def _stack(self, indices: Any) -> np.ndarray:
        images = np.empty((len(indices), self.size, self.size, 3), dtype=np.uint8)
        for row, index in enumerate(indices):
            images[row] = self.decode(int(index))
        return images

    def subset(self, indices: np.ndarray) -> "ImageFiles":
        """The files at `indices`, still undecoded."""
        return ImageFiles([self.paths[int(index)] for index in indices], self.size)


def _images_of(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)


def _split_folder(data_dir: Path, names: Sequence[str]) -> Path | None:
    return next((data_dir / name for name in names if (data_dir / name).is_dir()), None)


def read_image_folder(data_dir: Path, *, download: bool = True, seed: int = 0,
                      data_size: int = 224) -> tuple[Any, ...]:
    """(train files, train labels, test files, test labels, source) of data_dir/train/<class>/... and
    data_dir/val/<class>/... (or test/); classes are the train folder's subfolders in sorted order."""
    train_folder = _split_folder(data_dir, TRAIN_SPLITS)
    test_folder = _split_folder(data_dir, TEST_SPLITS)
    if train_folder is None or test_folder is None:
        raise UserError(f"--dataset imagefolder needs {data_dir}/train/<class>/<images> and {data_dir}/val/<class>/"
                        "<images> (or test/); check --data_dir")
    classes = sorted(path.name for path in train_folder.iterdir() if path.is_dir())
    if not classes:
        raise UserError(f"{train_folder} has no class folders (train/<class>/<images> expected)")
    splits = {}
    for folder in (train_folder, test_folder):
        paths: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            files = _images_of(folder / name) if (folder / name).is_dir() else []
            paths += files
            labels += [label] * len(files)
        unknown = sorted(path.name for path in folder.iterdir() if path.is_dir() and path.name not in classes)
        if unknown:
            raise UserError(f"{folder} has class folders that {train_folder} lacks ({', '.join(unknown[:3])}); "
                            "every class needs training images")
        if not paths:
            raise UserError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        splits[folder] = (ImageFiles(paths, data_size), np.asarray(labels, dtype=np.int64))
    return (*splits[train_folder], *splits[test_folder], str(data_dir))


# MocoSFL's prepare_imagenet12.py writes data/imagnet-12/{train,val}/<class>/ (its spelling).
IMAGENET12_FOLDERS = ("imagnet-12", "imagenet-12", "imagenet12")


def read_imagenet12(data_dir: Path, *, download: bool = True, seed: int = 0) -> tuple[Any, ...]:
    """MocoSFL's ImageNet-12 (12 ImageNet classes) at 224 px, from --data_dir/imagnet-12 (MocoSFL's folder) or a
    folder of that layout given directly."""
    for folder in (*(data_dir / name for name in IMAGENET12_FOLDERS), data_dir):
        if _split_folder(folder, TRAIN_SPLITS) and _split_folder(folder, TEST_SPLITS):
            read = read_image_folder(folder, data_size=224)
            if int(read[1].max()) + 1 != 12:
                raise UserError(f"{folder} holds {int(read[1].max()) + 1} classes, ImageNet-12 has 12; check --data_dir")
            return read
    raise UserError(f"ImageNet-12 not found in {data_dir}: MocoSFL's prepare_imagenet12.py writes imagnet-12/train/"
                    "<class>/ and imagnet-12/val/<class>/ from ImageNet (it cannot be downloaded); pass --data_dir "
                    "pointing to the folder that holds imagnet-12")
