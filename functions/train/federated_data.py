"""The data of one run: the dataset, its split across clients, each client's batch, the step schedule and the
loaders of this process (torchvision or DALI; the loop cannot tell which)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from functions.core.distributed import Runtime, check_clients_per_rank, client_shares
from functions.core.errors import UserError
from functions.core.options import (
    ClientOptions,
    DatasetOptions,
    LoaderOptions,
    PartitionOptions,
    RunLengthOptions,
)
from functions.data.datasets import ImageDataset, download_allowed, load_dataset
from functions.data.loaders import (
    MAX_STREAM_POSITION,
    FederatedLoaders,
    FederatedSchedule,
    StepBatch,
    default_steps_per_epoch,
)
from functions.data.partition import hetero_partition, make_partition, partition_hash, save_partition
from functions.data.views import ViewSpec

logger = logging.getLogger("sfl")


def client_batch_sizes(clients: ClientOptions, client_sizes: Sequence[int]) -> list[int]:
    """Rows each client sends per step: --batch_size, or with --hetero proportional to the client's data size."""
    if not clients.hetero:
        return [clients.batch_size] * len(client_sizes)
    mean_size = float(np.mean(client_sizes))
    return [max(1, int(round(clients.batch_size * size / mean_size))) for size in client_sizes]


def build_loaders(dataset: ImageDataset, schedule: FederatedSchedule, view_spec: ViewSpec, *, use_dali: bool,
                  dali_device: str | None, device: torch.device, eval_batch_size: int, num_workers: int,
                  seed: int) -> FederatedLoaders:
    """The torch (torchvision) or DALI data path; both return the same FederatedLoaders contract."""
    if use_dali:
        try:
            from Dali.get_dali_dataloader import build_dali_loaders
        except ImportError as error:
            if "nvidia" not in str(error):
                raise
            raise UserError("--use_dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or drop --use_dali)") from None
        return build_dali_loaders(dataset, schedule, view_spec, device=device, dali_device=dali_device,
                                  eval_batch_size=eval_batch_size, num_threads=max(1, num_workers), seed=seed)
    from multicropdataset import build_torch_loaders, multicrop_transforms

    return build_torch_loaders(dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels,
                               dataset.mean, dataset.std, schedule,
                               multicrop_transforms(dataset.mean, dataset.std, view_spec),
                               eval_batch_size=eval_batch_size, num_workers=num_workers, device=device,
                               num_classes=dataset.num_classes, memory=dataset.memory_split)


def check_run_length(length: RunLengthOptions, steps_per_epoch: int, largest_batch: int) -> None:
    """Refuse a run longer than a client's sample stream can address (the samples and augmentations of a step are a
    function of its position in that stream), naming the options that make it so long."""
    samples = length.num_epoch * steps_per_epoch * largest_batch
    if samples >= MAX_STREAM_POSITION:
        options = "--num_epoch" + (f" or --local_epoch {length.local_epoch}" if length.scheme == "fl" else "")
        raise UserError(f"--num_epoch {length.num_epoch} epochs of {steps_per_epoch} steps of up to {largest_batch} "
                        f"samples per client exceed the {MAX_STREAM_POSITION} samples a client's stream can address; "
                        f"lower {options}")


class FederatedData:
    """The dataset, the partition (saved to the run folder by rank 0), the schedule and the loaders of a run."""

    def __init__(self, view_spec: ViewSpec, runtime: Runtime, output_dir: Path, *, dataset: DatasetOptions,
                 partition: PartitionOptions, clients: ClientOptions, loaders: LoaderOptions,
                 length: RunLengthOptions) -> None:
        self.runtime = runtime
        self.dataset = load_dataset(dataset.dataset, dataset.data_dir, download=download_allowed(),
                                    data_proportion=dataset.data_proportion, seed=dataset.seed,
                                    data_size=dataset.data_size)
        self.client_indices = self._partition(partition, output_dir)
        self.client_sizes = [len(indices) for indices in self.client_indices]
        self.partition_hash = partition_hash(self.client_indices)
        self.batch_sizes = client_batch_sizes(clients, self.client_sizes)
        self._warn_small_shards()
        steps = default_steps_per_epoch(self.client_indices, self.batch_sizes, clients.client_sample_ratio)
        if length.scheme == "fl":
            steps *= length.local_epoch  # FL-MoCo: an epoch is --local_epoch passes of every client over its data
        check_run_length(length, steps, max(self.batch_sizes))
        self.schedule = FederatedSchedule(self.client_indices, self.batch_sizes, clients.client_sample_ratio, steps,
                                          loaders.seed)
        if runtime.is_distributed:
            check_clients_per_rank(self.schedule.pool_size, clients.num_client, clients.client_sample_ratio,
                                   runtime.world_size)
        self.loaders = build_loaders(self.dataset, self.schedule, view_spec, use_dali=loaders.use_dali,
                                     dali_device=loaders.dali_device, device=runtime.device,
                                     eval_batch_size=loaders.eval_batch_size, num_workers=loaders.num_workers,
                                     seed=loaders.seed)
        self.steps_per_epoch = self.loaders.train.steps_per_epoch
        self._pool_rows: dict[int, int] = {}

    @classmethod
    def from_args(cls, args: argparse.Namespace, view_spec: ViewSpec, runtime: Runtime,
                  output_dir: Path) -> FederatedData:
        """The data of the run a parsed namespace describes."""
        return cls(view_spec, runtime, output_dir, dataset=DatasetOptions.from_args(args),
                   partition=PartitionOptions.from_args(args), clients=ClientOptions.from_args(args),
                   loaders=LoaderOptions.from_args(args), length=RunLengthOptions.from_args(args))

    def _partition(self, options: PartitionOptions, output_dir: Path) -> list[np.ndarray]:
        """Each client's training-sample indices (rank 0 writes partition.json and partition.png)."""
        labels, num_classes = self.dataset.train_labels, self.dataset.num_classes
        if self.dataset.has_unlabelled:
            if options.partition != "iid":
                raise UserError(f"--dataset {self.dataset.name} trains on unlabelled images too: a {options.partition} "
                                "partition follows labels they do not have; use --partition iid, or a dataset of "
                                "labelled images only for non-IID clients")
            # Unlabelled images count as one more column of the class counts (the last one).
            labels, num_classes = np.where(labels < 0, num_classes, labels), num_classes + 1
        if options.hetero and options.partition == "iid":
            indices = hetero_partition(len(labels), options.num_client, options.hetero_string, options.seed)
        else:
            indices = make_partition(labels, options.num_client, options.partition, num_classes,
                                     dirichlet_alpha=options.dirichlet_alpha, noniid_ratio=options.noniid_ratio,
                                     min_client_samples=options.min_client_samples, seed=options.seed)
        if self.runtime.is_main:
            save_partition(output_dir, labels, indices, num_classes,
                           extra={"partition": options.partition, "dirichlet_alpha": options.dirichlet_alpha,
                                  "noniid_ratio": options.noniid_ratio, "seed": options.seed,
                                  "hetero": options.hetero})
        return indices

    def _warn_small_shards(self) -> None:
        """Say when clients hold fewer samples than their batch: their batches repeat samples within a step."""
        # Not an error: a client reads its shard as an endless stream of reshuffled passes (there is no drop-last),
        # so a batch larger than the shard wraps around; each repeat is a new stream position with its own augmentation.
        small = [(size, batch) for size, batch in zip(self.client_sizes, self.batch_sizes) if size < batch]
        if small:
            size, batch = min(small)
            logger.warning(f"{len(small)} of {len(self.client_sizes)} clients hold fewer samples than their batch "
                           f"(smallest: {size} samples, batch {batch}); their batches repeat samples within a step")

    def pool(self, epoch: int) -> list[int]:
        """The clients sampled for `epoch`, ascending (every rank's)."""
        return self.loaders.train.pool(epoch)

    def own_clients(self, epoch: int) -> list[int]:
        """The clients of `epoch`'s pool this process trains (all of them in a single process)."""
        pool = self.pool(epoch)
        if not self.runtime.is_distributed:
            return pool
        return client_shares(pool, self.runtime.world_size)[self.runtime.rank]

    def pool_rows(self, epoch: int) -> int:
        """Rows of one step of `epoch` over the whole pool (every rank's clients)."""
        if epoch not in self._pool_rows:
            self._pool_rows[epoch] = sum(self.batch_sizes[c] for c in self.pool(epoch))
        return self._pool_rows[epoch]

    def row_share(self, batch: StepBatch, epoch: int) -> float:
        """This process's fraction of the step's rows (1 in a single process)."""
        if not self.runtime.is_distributed:
            return 1.0
        return batch.num_rows / self.pool_rows(epoch)
