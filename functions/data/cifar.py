"""CIFAR-10/100 in the official python format, read into NHWC uint8 arrays; download when missing.

The reader is our own (no torchvision dataset classes) so that trimmed or re-pickled copies of the official
batches, such as the bundled sample in ``sample_data/``, load as long as their layout is right.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from functions.core.errors import UserError

IMAGE_SIZE = 32
CHANNELS = 3
ROW_LENGTH = CHANNELS * IMAGE_SIZE * IMAGE_SIZE  # 3072: 1024 R, then 1024 G, then 1024 B values per image
DOWNLOAD_TIMEOUT_S = 15.0  # per socket operation; an offline machine fails fast instead of hanging


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives on disk and on the web, and how its batch files are keyed."""

    name: str
    display_name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    url: str
    md5: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def archive_name(self) -> str:
        """File name of the official archive."""
        return self.url.rsplit("/", 1)[-1]


CIFAR_SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        name="cifar10",
        display_name="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        # MocoSFL's constants (its CIFAR10_TRAIN_MEAN / _STD). The pixels' own std is (0.2470, 0.2435, 0.2616):
        # normalised inputs are about 1.2x wider than unit variance, as in MocoSFL.
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
    ),
    "cifar100": CifarSpec(
        name="cifar100",
        display_name="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        mean=(0.5070751592371323, 0.48654887331495095, 0.4409178433670343),  # MocoSFL's, to all its digits
        std=(0.2673342858792401, 0.2564384629170883, 0.27615047132568404),
    ),
}

# The only globals a CIFAR batch pickle needs (numpy arrays, latin1 byte strings); anything else is refused,
# so a stray or malicious file in the data folder cannot run code when it is read.
_ALLOWED_PICKLE_GLOBALS: dict[tuple[str, str], tuple[str, ...]] = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
    ("numpy", "ndarray"): ("numpy",),
    ("numpy", "dtype"): ("numpy",),
    ("_codecs", "encode"): ("_codecs",),
    ("copy_reg", "_reconstructor"): ("copyreg",),
    ("copyreg", "_reconstructor"): ("copyreg",),
    ("__builtin__", "object"): ("builtins",),
    ("builtins", "object"): ("builtins",),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy and codec globals used by CIFAR batch files."""

    def find_class(self, module: str, name: str) -> object:
        """Return an allowed global, preferring numpy._core (numpy >= 1.26) over the deprecated numpy.core."""
        candidates = _ALLOWED_PICKLE_GLOBALS.get((module, name))
        if candidates is None:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        for candidate in candidates:
            try:
                imported = __import__(candidate, fromlist=[name])
            except ImportError:
                continue
            return getattr(imported, name)
        raise pickle.UnpicklingError(f"cannot import {module}.{name}")


def _load_pickle(path: Path) -> object:
    """Unpickle a python-format batch file with latin1 strings (the official files come from Python 2)."""
    with open(path, "rb") as handle:
        return _BatchUnpickler(handle, encoding="latin1").load()


def rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
    """Turn (N, 3072) CIFAR rows (planar R, G, B, each row-major 32x32) into C-contiguous (N, 32, 32, 3) uint8."""
    planar = rows.reshape(-1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    return np.ascontiguousarray(planar.transpose(0, 2, 3, 1), dtype=np.uint8)


def read_batch(path: str | os.PathLike, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python-format batch file into (NHWC uint8 images, int64 labels), checking its layout."""
    path = Path(path)
    fix = "re-download or re-extract the dataset"
    if not path.is_file():
        raise UserError(f"CIFAR batch file {path} is missing; {fix}")
    try:
        batch = _load_pickle(path)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, ImportError, UnicodeDecodeError, MemoryError, OverflowError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"cannot read CIFAR batch file {path} (truncated or not a CIFAR python batch: {reason}); "
                        f"{fix}") from error
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        found = sorted(map(str, batch.keys())) if isinstance(batch, dict) else type(batch).__name__
        raise UserError(f"CIFAR batch file {path} has the wrong layout: expected keys 'data' and '{label_key}', "
                        f"found {found}; {fix}")
    data = np.asarray(batch["data"])
    if data.ndim != 2 or data.shape[1] != ROW_LENGTH or data.dtype != np.uint8:
        raise UserError(f"CIFAR batch file {path} has the wrong layout: 'data' should be uint8 rows of "
                        f"{ROW_LENGTH} values, found dtype {data.dtype} shape {data.shape}; {fix}")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise UserError(f"CIFAR batch file {path} has non-integer '{label_key}'; {fix}") from error
    if labels.shape[0] != data.shape[0]:
        raise UserError(f"CIFAR batch file {path} has {data.shape[0]} images but {labels.shape[0]} labels; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"CIFAR batch file {path} has labels outside 0..{num_classes - 1}; {fix}")
    return rows_to_nhwc(data), labels


def download_file(url: str, destination: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download url to destination through a temporary .part file, with a tqdm progress bar."""
    from tqdm import tqdm

    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {destination.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)


def file_md5(path: Path) -> str:
    """MD5 hex digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_tar_gz(archive: Path, data_dir: Path) -> None:
    """Extract a .tar.gz into data_dir, refusing members that would land outside it."""
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(data_dir, filter="data")
        else:  # Python without extraction filters: check member paths ourselves
            root = data_dir.resolve()
            for member in tar.getmembers():
                if not (data_dir / member.name).resolve().is_relative_to(root) or member.issym() or member.islnk():
                    raise tarfile.TarError(f"unsafe member {member.name}")
            tar.extractall(data_dir)


def _download_and_extract(spec: CifarSpec, data_dir: Path) -> None:
    """Fetch the official archive into data_dir (unless a verified copy is there), check its md5, extract it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / spec.archive_name
    if not (archive.is_file() and file_md5(archive) == spec.md5):
        download_file(spec.url, archive)
        checksum = file_md5(archive)
        if checksum != spec.md5:
            archive.unlink()
            raise ValueError(f"md5 {checksum} of the downloaded file differs from the official {spec.md5}")
    extract_tar_gz(archive, data_dir)


def _missing_data_message(spec: CifarSpec, data_dir: Path, reason: str | None) -> str:
    """One line naming the expected folder and how to obtain it."""
    folder = data_dir / spec.folder
    why = f" and it could not be downloaded ({reason})" if reason else " (download disabled)"
    return (f"{spec.display_name} not found at {folder}{why}; download {spec.url} and extract it into {data_dir}, "
            f"or pass --data_dir pointing to the folder that contains {spec.folder}")


def _ensure_cifar_folder(spec: CifarSpec, data_dir: Path, download: bool) -> Path:
    """Return the batch folder, downloading and extracting the official archive when it is absent."""
    folder = data_dir / spec.folder
    if folder.is_dir():
        return folder
    if not download:
        raise UserError(_missing_data_message(spec, data_dir, None))
    try:
        _download_and_extract(spec, data_dir)
    except (OSError, ValueError, tarfile.TarError, EOFError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserError(_missing_data_message(spec, data_dir, reason)) from error
    if not folder.is_dir():
        raise UserError(_missing_data_message(spec, data_dir, f"the archive did not contain {spec.folder}"))
    return folder


def _read_split(folder: Path, files: tuple[str, ...], spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate the batch files of one split."""
    parts = [read_batch(folder / file_name, spec.label_key, spec.num_classes) for file_name in files]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return images, labels


def read_cifar(name: str, data_dir: str | os.PathLike, *, download: bool = True) -> tuple[np.ndarray, ...]:
    """(train images, train labels, test images, test labels, source folder) of cifar10 or cifar100 in data_dir.

    The folder is downloaded (official archive, md5-checked) and extracted when missing and `download` is true.
    """
    spec = CIFAR_SPECS[name]
    folder = _ensure_cifar_folder(spec, Path(data_dir), download)
    train_images, train_labels = _read_split(folder, spec.train_files, spec)
    test_images, test_labels = _read_split(folder, spec.test_files, spec)
    return train_images, train_labels, test_images, test_labels, str(folder)
