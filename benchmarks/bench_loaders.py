"""Training-loader throughput: DALI (CPU or GPU operators) against the torch path, MoCo pairs and SwAV multi-crop.

    python -m benchmarks.bench_loaders                      # real CIFAR-10 if --data_dir has it, else synthetic images
    python -m benchmarks.bench_loaders --data_dir ./data --images 4096 --runs 5 --json bench.json

Each configuration reads one warm-up epoch, then `--runs` timed epochs; the table gives the median source
images per second (each image yields 2 crops for MoCo, 8 for the 2x32 + 6x16 multi-crop) and the machine's
load average before and after, since other jobs on a shared machine change the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from functions.core.errors import UserError, run_cli
from functions.data.datasets import ImageDataset, load_dataset, make_synthetic
from functions.data.loaders import FederatedSchedule, TrainLoader
from functions.data.views import ViewSpec
from functions.train.federated_data import build_loaders

VIEW_SPECS = {
    "moco 2x32": ViewSpec(nmb_crops=(2,), size_crops=(32,), min_scale_crops=(0.2,), max_scale_crops=(1.0,)),
    "swav 2x32+6x16": ViewSpec(nmb_crops=(2, 6), size_crops=(32, 16), min_scale_crops=(0.14, 0.05),
                               max_scale_crops=(1.0, 0.14)),
}


def epoch_images_per_second(loader: TrainLoader, epoch: int) -> float:
    """Source images per second of one full epoch of `loader` (crops are produced but not used)."""
    start, rows = time.perf_counter(), 0
    for batch in loader.epoch(epoch):
        rows += batch.num_rows
    return rows / (time.perf_counter() - start)


def median_throughput(loader: TrainLoader, runs: int) -> float:
    """Median images per second over `runs` epochs after one warm-up epoch."""
    epoch_images_per_second(loader, 0)
    return statistics.median(epoch_images_per_second(loader, epoch) for epoch in range(1, runs + 1))


SYNTHETIC_CHUNK = 8192  # images generated at once: keeps the generator's float64 scratch to a few hundred MB


def synthetic_images(images: int, seed: int = 0) -> ImageDataset:
    """`images` synthetic training images (and 16 test images), generated chunk by chunk to bound memory."""
    first = load_dataset("synthetic", ".", synthetic_train=min(images, SYNTHETIC_CHUNK), synthetic_test=16, seed=seed)
    chunks, labels = [first.train_images], [first.train_labels]
    for number, start in enumerate(range(SYNTHETIC_CHUNK, images, SYNTHETIC_CHUNK), start=1):
        # Each chunk has its own seed (hence its own colour palette); the mean and std stay the first chunk's,
        # which is all a throughput measurement needs.
        chunk_images, chunk_labels, _, _ = make_synthetic(min(SYNTHETIC_CHUNK, images - start), 1, seed + number)
        chunks.append(chunk_images)
        labels.append(chunk_labels)
    if len(chunks) > 1:
        first.train_images, first.train_labels = np.concatenate(chunks), np.concatenate(labels)
    return first


def load_images(data_dir: str, images: int, *, synthetic_when_short: bool = False) -> ImageDataset:
    """The first `images` CIFAR-10 training images from data_dir, or synthetic ones when it has none.

    When data_dir holds fewer than `images`, that is a UserError, or with `synthetic_when_short` a synthetic
    set whose `source` says why it was used.
    """
    if not (Path(data_dir) / "cifar-10-batches-py").is_dir():
        return synthetic_images(images)
    dataset = load_dataset("cifar10", data_dir, download=False)
    available = dataset.train_images.shape[0]
    if available < images:
        if not synthetic_when_short:
            raise UserError(f"{dataset.source} has {available} training images, fewer than --images {images}; "
                            "lower --images")
        synthetic = synthetic_images(images)
        synthetic.source = f"synthetic ({dataset.source} holds {available} training images, {images} needed)"
        return synthetic
    dataset.train_images = dataset.train_images[:images]
    dataset.train_labels = dataset.train_labels[:images]
    return dataset


def dali_import_error() -> str | None:
    """Why NVIDIA DALI cannot be imported here, or None when it can."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError) as error:
        return str(error) or type(error).__name__
    return None


def torch_train_loader(dataset: ImageDataset, schedule: FederatedSchedule, views: ViewSpec, *, num_workers: int,
                       device: torch.device = torch.device("cpu")) -> TrainLoader:
    """The training loop's torchvision loader of the schedule, delivering its crops to `device`."""
    return build_loaders(dataset, schedule, views, use_dali=False, dali_device=None, device=device,
                         eval_batch_size=512, num_workers=num_workers, seed=0).train


def dali_train_loader(dataset: ImageDataset, schedule: FederatedSchedule, views: ViewSpec, *, dali_device: str,
                      num_threads: int, device: torch.device = torch.device("cpu"), seed: int = 0) -> TrainLoader:
    """The training loop's DALI loader of the schedule (operators on `dali_device`), delivering crops to `device`."""
    return build_loaders(dataset, schedule, views, use_dali=True, dali_device=dali_device, device=device,
                         eval_batch_size=512, num_workers=num_threads, seed=seed).train


def loader_builders(dataset: ImageDataset, schedule: FederatedSchedule, views: ViewSpec, dali_threads: int,
                    dali_device: str) -> dict[str, Callable[[], TrainLoader]]:
    """Named constructors of the compared training loaders."""
    return {
        f"dali {dali_device}, {dali_threads} threads": lambda: dali_train_loader(
            dataset, schedule, views, dali_device=dali_device, num_threads=dali_threads),
        "torch, num_workers 0": lambda: torch_train_loader(dataset, schedule, views, num_workers=0),
        "torch, num_workers 2": lambda: torch_train_loader(dataset, schedule, views, num_workers=2),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Measure every loader on every view spec; print a markdown table and return the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="./data", help="folder holding cifar-10-batches-py/ (else synthetic)")
    parser.add_argument("--images", type=int, default=2048, help="training images per epoch")
    parser.add_argument("--num_client", type=int, default=8, help="clients in every step")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per client per step")
    parser.add_argument("--runs", type=int, default=5, help="timed epochs per loader (after one warm-up epoch)")
    parser.add_argument("--dali_threads", type=int, default=2, help="DALI CPU threads")
    parser.add_argument("--dali_device", choices=["cpu", "gpu"], default="cpu", help="where DALI runs its operators")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.images < args.num_client * args.batch_size or args.runs < 1:
        raise UserError("--images must cover at least one step (num_client x batch_size) and --runs be at least 1")

    dataset = load_images(args.data_dir, args.images)
    shards = np.array_split(np.arange(args.images), args.num_client)
    steps = args.images // (args.num_client * args.batch_size)
    schedule = FederatedSchedule(shards, [args.batch_size] * args.num_client, 1.0, steps, seed=0)
    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, float]] = {}
    for view_name, views in VIEW_SPECS.items():
        for loader_name, build in loader_builders(dataset, schedule, views, args.dali_threads,
                                                  args.dali_device).items():
            results.setdefault(loader_name, {})[view_name] = median_throughput(build(), args.runs)
            print(f"{view_name:16s} {loader_name:26s} {results[loader_name][view_name]:8.0f} images/s", flush=True)
    load_after = os.getloadavg()[0]

    print(f"\n{dataset.source}: {args.images} images per epoch, {args.num_client} clients x {args.batch_size} rows, "
          f"{os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, "
          f"load average {load_before:.1f} before, {load_after:.1f} after")
    print("| loader | " + " | ".join(VIEW_SPECS) + " |")
    print("| --- |" + " --- |" * len(VIEW_SPECS))
    for loader_name, row in results.items():
        print(f"| {loader_name} | " + " | ".join(f"{row[view]:.0f}" for view in VIEW_SPECS) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "load_before": load_before,
                                               "load_after": load_after, "arguments": vars(args)}, indent=2))
    return results


if __name__ == "__main__":
    run_cli(lambda: main())
