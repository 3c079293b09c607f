"""Write the bundled CIFAR-10 sample: the first images of each official batch, in the official python format.

Usage: python sample_data/make_sample.py SOURCE [--output OUT] [--train_per_batch 400] [--test 500]
SOURCE is a folder holding cifar-10-batches-py/ (or that folder itself); OUT defaults to sample_data/cifar10.
"""
from __future__ import annotations

import argparse
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np

BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"


def resolve_batch_folder(source: Path) -> Path:
    """The cifar-10-batches-py folder named by source (the folder itself or its parent)."""
    folder = source if source.name == BATCH_FOLDER else source / BATCH_FOLDER
    if not (folder / TRAIN_FILES[0]).is_file():
        raise SystemExit(f"error: no CIFAR-10 batches found at {folder}")
    return folder


def truncate_batch(source_file: Path, target_file: Path, count: int) -> int:
    """Copy the first `count` images of a batch file, keeping its keys; returns the number written."""
    with open(source_file, "rb") as handle:
        batch = pickle.load(handle, encoding="latin1")
    count = min(count, len(batch["data"]))
    trimmed = dict(batch)
    trimmed["data"] = np.ascontiguousarray(np.asarray(batch["data"], dtype=np.uint8)[:count])
    for key in ("labels", "filenames"):  # per-image lists; other keys (batch_label) are kept as they are
        if key in batch:
            trimmed[key] = list(batch[key][:count])
    with open(target_file, "wb") as handle:
        # Protocol 4 stores the pixel bytes raw (protocol 2 from Python 3 inflates them about 1.4x via latin1 text).
        pickle.dump(trimmed, handle, protocol=4)
    return count


def make_sample(source: Path, output: Path, train_per_batch: int, test_count: int) -> tuple[int, int]:
    """Write the sample batches and a copy of batches.meta under output/cifar-10-batches-py."""
    source_folder = resolve_batch_folder(source)
    target_folder = output / BATCH_FOLDER
    target_folder.mkdir(parents=True, exist_ok=True)
    train_total = sum(truncate_batch(source_folder / name, target_folder / name, train_per_batch)
                      for name in TRAIN_FILES)
    test_total = truncate_batch(source_folder / TEST_FILE, target_folder / TEST_FILE, test_count)
    shutil.copyfile(source_folder / META_FILE, target_folder / META_FILE)
    return train_total, test_total


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and write the sample."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder holding cifar-10-batches-py/ (or that folder)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "cifar10",
                        help="where to write cifar-10-batches-py/ (default: sample_data/cifar10)")
    parser.add_argument("--train_per_batch", type=int, default=400, help="images kept from each data_batch_i")
    parser.add_argument("--test", type=int, default=500, help="images kept from test_batch")
    args = parser.parse_args(argv)
    train_total, test_total = make_sample(args.source, args.output, args.train_per_batch, args.test)
    print(f"wrote {train_total} train and {test_total} test images to {args.output / BATCH_FOLDER}")


if __name__ == "__main__":
    main(sys.argv[1:])
