"""The data mode of bench_sfl (`--modes data`): throughput of the training loaders (torch, DALI) alone.

The `data` mode (only when asked in `--modes`) times the training loader instead: per client count, each client
holds `--data_images_per_client` images of the first clients x that many CIFAR-10 images of `--data_dir`
(synthetic images when it has none or too few; the record's `data_source` says which), the pool of
`--sampled_clients` clients reads `--per_client_batch` rows each per step, and every loader of `--loaders` (torch
with `--num_workers`; DALI with its operators on `--dali_device`) makes the method's views: MoCo's two 32-pixel
crops or the SwAV defaults' multi-crop. The clock runs while the loader produces step batches, crops on
`--device` (wall-clock; on CUDA synchronised before it stops); warm-up steps, repeats and the median are as for
the step modes, and `images_per_sec` again counts source images (rows of the global batch) with all their crops.
`cpu_step_ms` leaves out torch's worker processes (None when `--num_workers` > 0), and DALI's GPU memory is not
in `peak_mem_mb` (DALI allocates outside torch).
"""
from __future__ import annotations

import argparse
import gc
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import torch

from benchmarks.bench_loaders import dali_train_loader, load_images, torch_train_loader
from functions.data.loaders import FederatedSchedule, StepBatch, TrainLoader
from functions.data.views import ViewSpec

DATA_MODE = "data"                        # the training loader, measured only when asked


def peak_rss_mb() -> float:
    """Peak resident set of this process so far, in MB (ru_maxrss is KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


@dataclass(frozen=True)
class DataSetting:
    """One measured training loader."""

    method: str
    device: str
    clients: int
    sampled_clients: int
    per_client_batch: int
    loader: str                # "torch", "dali-cpu" or "dali-gpu"
    num_workers: int | None    # DataLoader worker processes (torch only)
    dali_threads: int | None   # DALI CPU threads (DALI only)
    images_per_client: int


def timed_batches(batches: Iterator[StepBatch], steps: int, device: torch.device) -> tuple[float, float, list[int]]:
    """(seconds, process CPU seconds, rows of each batch) of producing the next `steps` step batches on `device`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin, cpu_begin = time.perf_counter(), time.process_time()
    rows = [next(batches).num_rows for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the crops are on the GPU only once their copies have finished
    return time.perf_counter() - begin, time.process_time() - cpu_begin, rows


def measure_loader(setting: DataSetting, loader: TrainLoader, device: torch.device, *, steps: int, warmup: int,
                   repeats: int, data_source: str) -> dict[str, Any]:
    """Throughput and peak memory of one training loader over warm-up plus `repeats` x `steps` steps of epoch 0."""
    if loader.steps_per_epoch != warmup + repeats * steps:
        raise ValueError(f"the loader has {loader.steps_per_epoch} steps per epoch, the measurement needs "
                         f"{warmup + repeats * steps}")
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = peak_rss_mb()
    batches = loader.epoch(0)
    first = next(batches)
    crop_sizes, rows = [int(crop.shape[-1]) for crop in first.crops], [first.num_rows]
    del first  # not kept through the timed steps
    rows.extend(next(batches).num_rows for _ in range(warmup - 1))
    timings = []
    for _ in range(repeats):
        seconds, cpu_seconds, timed_rows = timed_batches(batches, steps, device)
        timings.append((seconds, cpu_seconds))
        rows.extend(timed_rows)
    if next(batches, None) is not None:  # ending the epoch also stops torch's workers and drains DALI
        raise RuntimeError("the loader delivered more steps than its epoch has")
    if len(set(rows)) != 1:
        raise RuntimeError(f"the loader delivered steps of different sizes: {sorted(set(rows))}")
    seconds = [wall for wall, _ in timings]
    median = statistics.median(seconds)
    cpu_median = statistics.median(cpu for _, cpu in timings)
    if device.type == "cuda":
        peak_mem_mb, peak_mem_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    else:
        peak_mem_mb, peak_mem_kind = max(0.0, peak_rss_mb() - rss_before), "cpu_peak_rss_increase"
    # Process CPU time misses the work of torch's worker processes, so it is left out where they do it.
    cpu_step_ms = None if device.type == "cuda" or setting.num_workers else 1000.0 * cpu_median / steps
    return {
        "method": setting.method,
        "mode": DATA_MODE,
        **asdict(setting),
        "cutlayer": None,
        "amp": False,
        "engine": None,
        "data_source": data_source,
        "rows_per_step": rows[0],
        "crop_sizes": crop_sizes,
        "global_batch": setting.sampled_clients * setting.per_client_batch,
        "images_per_sec": rows[0] * steps / median,
        "step_ms": 1000.0 * median / steps,
        "step_ms_all": [1000.0 * s / steps for s in seconds],
        "cpu_step_ms": cpu_step_ms,
        "peak_mem_mb": peak_mem_mb,
        "peak_mem_kind": peak_mem_kind,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def data_records(options: argparse.Namespace, views: ViewSpec) -> list[dict[str, Any]]:
    """Per client count, the images and the schedule, then one measurement per loader of options.loader_names."""
    records = []
    for clients in options.clients:
        sampled = options.sampled_clients if options.sampled_clients is not None else min(clients, 100)
        dataset = load_images(options.data_dir, clients * options.data_images_per_client, synthetic_when_short=True)
        data_source = "cifar10" if dataset.name == "cifar10" else dataset.source
        shards = list(np.arange(clients * options.data_images_per_client).reshape(clients, -1))
        schedule = FederatedSchedule(shards, [options.per_client_batch] * clients, sampled / clients,
                                     options.warmup + options.repeats * options.steps, seed=options.seed)
        for name in options.loader_names:
            print(f"measuring {options.method} data:{name} clients={clients} ...", file=sys.stderr, flush=True)
            setting = DataSetting(method=options.method, device=str(options.device), clients=clients,
                                  sampled_clients=sampled, per_client_batch=options.per_client_batch, loader=name,
                                  num_workers=options.num_workers if name == "torch" else None,
                                  dali_threads=None if name == "torch" else options.dali_threads,
                                  images_per_client=options.data_images_per_client)
            if name == "torch":
                loader = torch_train_loader(dataset, schedule, views, num_workers=options.num_workers,
                                            device=options.device)
            else:
                loader = dali_train_loader(dataset, schedule, views, dali_device=options.dali_device,
                                           num_threads=options.dali_threads, device=options.device, seed=options.seed)
            records.append(measure_loader(setting, loader, options.device, steps=options.steps,
                                          warmup=options.warmup, repeats=options.repeats, data_source=data_source))
            del loader  # a DALI pipeline holds threads and buffers until it is collected
    return records
