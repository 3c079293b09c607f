"""Readers of STL-10 (binary), SVHN (.mat) and Tiny-ImageNet-200 (JPEG folders) into uint8 NHWC arrays and int64
labels, downloading the official files when they are missing (never with SFL_NO_DOWNLOAD=1).

Each reader takes the folder that holds the dataset's official layout (as its archive extracts) and returns
(train images, train labels, test images, test labels, source); functions.data.datasets registers them. Unlabelled
images carry the label -1 (UNLABELLED).
"""
from __future__ import annotations

import json
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from functions.core.errors import UserError
from functions.core.files import write_atomic, write_text_atomic
from functions.core.logs import logger
from functions.data import cifar
from functions.data.decoding import float_pixels_to_uint8, integer_pixels_to_uint8, one_line, open_rgb, read_bytes

UNLABELLED = -1


@dataclass(frozen=True)
class OfficialFile:
    """One file of a dataset's official release: where it comes from and what appears in the data folder."""

    display_name: str
    url: str
    md5: str
    target: str  # the folder an archive extracts to, or the file itself

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _extract(archive: Path, data_dir: Path) -> None:
    """Extract a .tar.gz or .zip into data_dir, refusing members that would land outside it."""
    if archive.name.endswith(".zip"):
        root = data_dir.resolve()
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.namelist():
                if not (data_dir / member).resolve().is_relative_to(root):
                    raise zipfile.BadZipFile(f"unsafe member {member}")
            bundle.extractall(data_dir)
    else:
        cifar.extract_tar_gz(archive, data_dir)


def ensure_official(official: OfficialFile, data_dir: Path, download: bool) -> Path:
    """The dataset folder or file in data_dir, downloaded (md5-checked) and extracted first when it is missing."""
    target = data_dir / official.target
    if target.exists():
        return target
    where = (f"download {official.url}" + ("" if official.target == official.file_name else " and extract it")
             + f" into {data_dir}, or pass --data_dir pointing to the folder that contains {official.target}")
    if not download:
        raise UserError(f"{official.display_name} not found at {target} (download disabled); {where}")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fetched = data_dir / official.file_name
        if not (fetched.is_file() and cifar.file_md5(fetched) == official.md5):
            cifar.download_file(official.url, fetched)
            checksum = cifar.file_md5(fetched)
            if checksum != official.md5:
                fetched.unlink()
                raise ValueError(f"md5 {checksum} of the downloaded file differs from the official {official.md5}")
        if fetched != target:
            _extract(fetched, data_dir)
    except (OSError, ValueError, tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"{official.display_name} not found at {target} and it could not be downloaded ({reason}); "
                        f"{where}") from error
    if not target.exists():
        raise UserError(f"{official.display_name}: the archive did not contain {official.target}; {where}")
    return target


def _check_labels(labels: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{source} has labels outside 0..{num_classes - 1}; the file is damaged or not the "
                        "dataset's; download it again")
    return labels


# ------------------------------------------------------------------------------------------------ STL-10
STL10 = OfficialFile("STL-10", "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                     "91f7769df0f17e558f3565bffb0c7dfb", "stl10_binary")
STL10_SIZE = 96


def read_stl10_images(path: Path) -> np.ndarray:
    """Images of an STL-10 *_X.bin file: each stored channel by channel, each channel column by column."""
    raw = read_bytes(path, "download STL-10 again")
    per_image = 3 * STL10_SIZE * STL10_SIZE
    if raw.size == 0 or raw.size % per_image:
        raise UserError(f"{path} holds {raw.size} bytes, not a whole number of 96x96 colour images; the file is "
                        "damaged; download STL-10 again")
    # (N, channel, column, row) as stored -> (N, row, column, channel).
    return np.ascontiguousarray(raw.reshape(-1, 3, STL10_SIZE, STL10_SIZE).transpose(0, 3, 2, 1))


def read_stl10_labels(path: Path, count: int) -> np.ndarray:
    """Labels of an STL-10 *_y.bin file (stored 1..10) as 0..9."""
    labels = read_bytes(path, "download STL-10 again").astype(np.int64) - 1
    if labels.size != count:
        raise UserError(f"{path} has {labels.size} labels for {count} images; download STL-10 again")
    return _check_labels(labels, 10, str(path))


def read_stl10(data_dir: Path, *, download: bool = True, seed: int = 0,
               with_unlabelled: bool = False) -> tuple[Any, ...]:
    """STL-10's labelled train (5,000) and test (8,000) images; with_unlabelled adds the 100,000 unlabelled images
    to the training images (label UNLABELLED)."""
    folder = ensure_official(STL10, data_dir, download)
    parts = {}
    for split in ("train", "test"):
        images_file, labels_file = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        for path in (images_file, labels_file):
            if not path.is_file():
                raise UserError(f"STL-10 folder {folder} has no {path.name}; download STL-10 again")
        images = read_stl10_images(images_file)
        parts[split] = (images, read_stl10_labels(labels_file, images.shape[0]))
    train_images, train_labels = parts["train"]
    if with_unlabelled:
        unlabelled_file = folder / "unlabeled_X.bin"
        if not unlabelled_file.is_file():
            raise UserError(f"STL-10 folder {folder} has no unlabeled_X.bin (the unlabelled split); download STL-10 "
                            "again, or use --dataset stl10 (labelled images only)")
        unlabelled = read_stl10_images(unlabelled_file)
        train_images = np.concatenate([train_images, unlabelled])
        train_labels = np.concatenate([train_labels, np.full(unlabelled.shape[0], UNLABELLED, dtype=np.int64)])
    return train_images, train_labels, *parts["test"], str(folder)


# -------------------------------------------------------------------------------------------------- SVHN
SVHN_FILES = {
    "train": OfficialFile("SVHN train", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                          "e26dedcc434d2e4c54c9b2d4a06d8373", "train_32x32.mat"),
    "test": OfficialFile("SVHN test", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                         "eb5a983be6a315427106f1b164d9cef3", "test_32x32.mat"),
    "extra": OfficialFile("SVHN extra", "http://ufldl.stanford.edu/housenumbers/extra_32x32.mat",
                          "a93ce644f1a588dc4d68dda5feec44a7", "extra_32x32.mat"),
}


SVHN_FIX = "download it again"
NUMERIC_KINDS = "iuf"  # signed, unsigned, floating point


def _svhn_array(content: dict[str, Any], key: str, path: Path) -> np.ndarray:
    """Variable `key` of a loaded SVHN .mat file, which must be a numeric array."""
    if key not in content:
        found = ", ".join(sorted(name for name in content if not name.startswith("__"))[:5]) or "none"
        raise UserError(f"{path} has no variable {key!r} (found {found}), so it is not an SVHN .mat file; "
                        f"{SVHN_FIX}")
    value = content[key]
    if not isinstance(value, np.ndarray) or value.dtype.kind not in NUMERIC_KINDS:
        kind = {"O": "a cell array", "U": "text", "S": "text", "V": "a struct"}.get(
            getattr(getattr(value, "dtype", None), "kind", ""), type(value).__name__)
        raise UserError(f"{path}: {key} is {kind}, not a numeric array as in SVHN's .mat files; {SVHN_FIX}")
    return value


def svhn_images_to_uint8(images: np.ndarray, path: Path) -> np.ndarray:
    """SVHN's pixels as uint8: uint8 as stored, other integers in 0..255, floats in [0, 1] or [0, 255]; a UserError
    for other values, or for images of one constant value (a damaged file)."""
    if images.dtype == np.uint8:
        pixels = images
    elif images.dtype.kind == "f":
        pixels = float_pixels_to_uint8(images, str(path))
    else:
        pixels = integer_pixels_to_uint8(images, str(path))
    if pixels.min() == pixels.max():
        raise UserError(f"{path} holds images of one constant value ({int(pixels.min())}); the file is damaged; "
                        f"{SVHN_FIX}")
    return pixels


def svhn_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """SVHN's labels (1..10, 10 standing for the digit 0; 0 is accepted as well) as 0..9."""
    values = labels.reshape(-1)
    if values.dtype.kind == "f" and not (np.isfinite(values).all() and (values == np.rint(values)).all()):
        raise UserError(f"{path} has labels that are not whole numbers; {SVHN_FIX}")
    if values.size and (values.min() < 0 or values.max() > 10):
        raise UserError(f"{path} has labels from {values.min():g} to {values.max():g}, SVHN's are 1..10; {SVHN_FIX}")
    return values.astype(np.int64) % 10


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of an SVHN *_32x32.mat file (X is 32x32x3xN; the digit 0 is stored as 10)."""
    from scipy.io import loadmat

    try:
        content = loadmat(path)
    except NotImplementedError:  # scipy's answer to MATLAB's v7.3 format, which is HDF5
        raise UserError(f"{path} is a MATLAB v7.3 (HDF5) file, which scipy cannot read; save it in the v7 format "
                        f"(MATLAB: save(..., '-v7')) or {SVHN_FIX}") from None
    except Exception as error:  # noqa: BLE001 - scipy's parsers raise many kinds of errors on a damaged file
        raise UserError(f"{path} is not an SVHN .mat file ({one_line(error)}); {SVHN_FIX}") from None
    images, labels = _svhn_array(content, "X", path), _svhn_array(content, "y", path)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or labels.size != images.shape[3]:
        raise UserError(f"{path} holds arrays of shape {images.shape} and {labels.shape}, not SVHN's 32x32x3xN "
                        f"images and N labels; {SVHN_FIX}")
    if images.shape[3] == 0:
        raise UserError(f"{path} holds no images; {SVHN_FIX}")
    pixels = svhn_images_to_uint8(images, path)
    return np.ascontiguousarray(pixels.transpose(3, 0, 1, 2)), _check_labels(svhn_labels(labels, path), 10, str(path))


def read_svhn(data_dir: Path, *, download: bool = True, seed: int = 0, with_extra: bool = False) -> tuple[Any, ...]:
    """SVHN's train (73,257) and test (26,032) digits; with_extra adds the 531,131 extra digits to the training
    images."""
    splits = ["train", "test", *(["extra"] if with_extra else [])]
    read = {split: read_svhn_mat(ensure_official(SVHN_FILES[split], data_dir, download)) for split in splits}
    train_images, train_labels = read["train"]
    if with_extra:
        train_images = np.concatenate([train_images, read["extra"][0]])
        train_labels = np.concatenate([train_labels, read["extra"][1]])
    return train_images, train_labels, *read["test"], str(data_dir)


# --------------------------------------------------------------------------------------- Tiny-ImageNet-200
TINY_IMAGENET = OfficialFile("Tiny-ImageNet-200", "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                             "90528d7ca1a48142e341f4ef8d21d0de", "tiny-imagenet-200")
TINY_SIZE = 64
DECODED_CACHE = ".decoded"  # beside the JPEGs: the decoded arrays, so later runs skip decoding
# What a cache listing records; a listing of another format (an older release's) is rebuilt.
CACHE_FORMAT = 2
TINY_FIX = "download Tiny-ImageNet again"


def _decode(paths: list[Path], size: int) -> np.ndarray:
    """Decode image files into one uint8 NHWC array (RGB); every image must be size x size."""
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for index, path in enumerate(paths):
        pixels = np.asarray(open_rgb(path))
        if pixels.shape[:2] != (size, size):
            raise UserError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels, Tiny-ImageNet's are {size}x{size}")
        images[index] = pixels
    return images


def _source_files(folder: Path, paths: list[Path]) -> list[list[Any]]:
    """[name inside folder, size in bytes, modification time in ns] of every image file: what a cache is keyed by."""
    files = []
    for path in paths:
        try:
            status = path.stat()
        except OSError as error:
            raise UserError(f"cannot read {path} ({error.strerror or error}); {TINY_FIX}") from None
        files.append([str(path.relative_to(folder)), status.st_size, status.st_mtime_ns])
    return files


def images_checksum(images: np.ndarray) -> str:
    """CRC-32 of an image array's bytes: the cache's check that its array is the one its listing describes (it
    guards against damage, fast enough for Tiny-ImageNet's 1.2 GB at every start)."""
    return f"{zlib.crc32(np.ascontiguousarray(images)):08x}"


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, links followed, lies inside the folder `root` (resolved)."""
    return path.resolve().is_relative_to(root)


def _read_cache(array_file: Path, listing_file: Path, key: dict[str, Any]) -> tuple[np.ndarray | None, str]:
    """(the cached images, "") when the listing records `key` and the array matches its checksum, else (None, why
    not)."""
    try:
        recorded = json.loads(listing_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or recorded.get("format") != CACHE_FORMAT:
        return None, f"{listing_file} is damaged or an older version's"
    if any(recorded.get(name) != value for name, value in key.items()):
        return None, "the images changed since it was written"
    try:
        with open(array_file, "rb") as handle:  # .npy only: np.load would also open a zip archive
            images = np.lib.format.read_array(handle, allow_pickle=False)
    except (OSError, ValueError, EOFError, MemoryError) as error:
        return None, f"{array_file} is damaged ({one_line(error)})"
    if images.dtype != np.uint8 or list(images.shape) != key["shape"]:
        return None, f"{array_file} holds another array than its listing describes"
    if images_checksum(images) != recorded.get("checksum"):
        return None, f"{array_file} differs from the array its listing describes"
    return images, ""


def _cached_decode(folder: Path, split: str, paths: list[Path], size: int) -> np.ndarray:
    """The decoded images of a split: read from the cache when it matches the image files (names, sizes and
    modification times) and its own checksum, else decoded and cached again.

    The cache is read and written only in the data folder's own .decoded/ (never through a link that leads out of
    it), atomically, and not at all where the folder is read-only.
    """
    root = folder.resolve()
    cache_dir = folder / DECODED_CACHE
    array_file, listing_file = cache_dir / f"{split}.npy", cache_dir / f"{split}.txt"
    key = {"format": CACHE_FORMAT, "shape": [len(paths), size, size, 3], "files": _source_files(folder, paths)}
    usable = cache_dir.resolve() == root / DECODED_CACHE
    if usable and array_file.exists() and listing_file.exists():
        if _inside(array_file, root) and _inside(listing_file, root):
            images, stale = _read_cache(array_file, listing_file, key)
        else:
            images, stale = None, "a link there leads out of the data folder"
        if images is not None:
            return images
        logger.info(f"decoding the Tiny-ImageNet {split} images again: the cache in {cache_dir} is out of date "
                    f"({stale})")
    images = _decode(paths, size)
    if usable:
        try:
            cache_dir.mkdir(exist_ok=True)
            # The array first: a listing always describes a complete array, its checksum catches any other.
            write_atomic(array_file, lambda stream: np.save(stream, images))
            write_text_atomic(listing_file, json.dumps({**key, "checksum": images_checksum(images)}))
        except (OSError, UserError):
            pass  # a read-only dataset folder: decode again next time
    return images


def _read_dataset_text(folder: Path, name: str) -> tuple[Path, list[str]]:
    """(path, non-empty lines) of a Tiny-ImageNet text file (wnids.txt, val/val_annotations.txt); a UserError naming
    it when it is missing or unreadable."""
    path = folder / name
    if not path.is_file():
        raise UserError(f"Tiny-ImageNet folder {folder} has no {name}; {TINY_FIX}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path} ({one_line(error)}); {TINY_FIX}") from None
    return path, [line for line in text.splitlines() if line.strip()]


def read_tiny_imagenet(data_dir: Path, *, download: bool = True, seed: int = 0) -> tuple[Any, ...]:
    """Tiny-ImageNet-200: 500 training images of each of its 200 classes (train/<wnid>/images) and the 10,000
    labelled validation images (val/images, labels in val/val_annotations.txt) as the test set."""
    folder = ensure_official(TINY_IMAGENET, data_dir, download)
    wnids_file, lines = _read_dataset_text(folder, "wnids.txt")
    wnids = [line.strip() for line in lines]
    if not wnids:
        raise UserError(f"{wnids_file} lists no classes; {TINY_FIX}")
    class_of = {wnid: index for index, wnid in enumerate(wnids)}
    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        files = sorted((folder / "train" / wnid / "images").glob("*.JPEG"))
        if not files:
            raise UserError(f"Tiny-ImageNet folder {folder} has no training images of class {wnid}; {TINY_FIX}")
        train_paths += files
        train_labels += [class_of[wnid]] * len(files)
    annotations, lines = _read_dataset_text(folder, "val/val_annotations.txt")
    test_paths: list[Path] = []
    test_labels: list[int] = []
    for line in lines:
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        if fields[1] not in class_of:
            raise UserError(f"{annotations} names class {fields[1]}, which wnids.txt does not list")
        if Path(fields[0]).name != fields[0] or fields[0] in ("", ".", ".."):
            raise UserError(f"{annotations} names {fields[0]!r}, not a file name in val/images; {TINY_FIX}")
        test_paths.append(folder / "val" / "images" / fields[0])
        test_labels.append(class_of[fields[1]])
    if not test_paths:
        raise UserError(f"{annotations} lists no validation images; {TINY_FIX}")
    return (_cached_decode(folder, "train", train_paths, TINY_SIZE), np.asarray(train_labels, dtype=np.int64),
            _cached_decode(folder, "val", test_paths, TINY_SIZE), np.asarray(test_labels, dtype=np.int64),
            str(folder))
