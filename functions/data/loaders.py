"""The loader contract shared by the torch and DALI data paths, and the federated step schedule.

A training step takes one batch from every client of the epoch's pool. Which samples those are is a
pure function of (seed, epoch, step): each client reads its own shard as an endless stream of
reshuffled passes, and its position in that stream is derived from the schedule, so a run resumed at
any step sees exactly the batches it would have seen, with nothing extra to checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from functions.core.errors import UserError

# Distinct stream tags keep the pool draws and the per-pass shuffles statistically independent
# even though both are keyed by small integers derived from the same seed.
_POOL_STREAM_TAG = 0x504F4F4C  # "POOL"
_PASS_STREAM_TAG = 0x50415353  # "PASS"

# Sample keys pack (client, stream position) into 64 bits before mixing; these widths bound both.
_POSITION_BITS = 40
_CLIENT_BITS = 64 - _POSITION_BITS
_MASK64 = (1 << 64) - 1


@dataclass
class StepBatch:
    """The augmented rows of one federated step, every crop tensor grouped by client in pool order."""

    crops: list[torch.Tensor]
    client_ids: list[int]
    rows_per_client: list[int]
    sample_indices: torch.Tensor

    def __post_init__(self) -> None:
        num_rows = sum(self.rows_per_client)
        if len(self.client_ids) != len(self.rows_per_client):
            raise ValueError("client_ids and rows_per_client must have the same length")
        if self.sample_indices.shape != (num_rows,):
            raise ValueError(f"sample_indices has shape {tuple(self.sample_indices.shape)}, expected ({num_rows},)")
        for crop_number, crop in enumerate(self.crops):
            if crop.shape[0] != num_rows:
                raise ValueError(f"crop {crop_number} has {crop.shape[0]} rows, expected {num_rows}")

    @property
    def num_rows(self) -> int:
        """Total rows of the step (the sum of rows_per_client)."""
        return int(sum(self.rows_per_client))

    def to(self, device: torch.device, non_blocking: bool = True) -> "StepBatch":
        """The same batch with its crop tensors on `device`; sample_indices stay on the CPU (bookkeeping only)."""
        return StepBatch(
            crops=[crop.to(device, non_blocking=non_blocking) for crop in self.crops],
            client_ids=list(self.client_ids),
            rows_per_client=list(self.rows_per_client),
            sample_indices=self.sample_indices,
        )


class TrainLoader(Protocol):
    """What the training loop needs from a training loader, whichever backend built it."""

    steps_per_epoch: int

    def pool(self, epoch: int) -> list[int]:
        """Clients sampled for `epoch`, ascending."""
        ...

    def epoch(self, epoch: int, start_step: int = 0, clients: Sequence[int] | None = None) -> Iterator[StepBatch]:
        """The step batches of `epoch` from `start_step` on, for all pool clients or the given subset."""
        ...


@dataclass
class FederatedLoaders:
    """Everything the training loop and the monitors read data from."""

    train: TrainLoader
    memory: Iterable[tuple[torch.Tensor, torch.Tensor]]
    test: Iterable[tuple[torch.Tensor, torch.Tensor]]
    backend: str
    num_classes: int


def splitmix64_finalize(values: np.ndarray) -> np.ndarray:
    """Bijective 64-bit mixing of a uint64 array (the SplitMix64 output function)."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def pool_size_of(num_clients: int, client_sample_ratio: float) -> int:
    """Clients per epoch: ratio of all clients rounded half up, at least one."""
    return max(1, min(num_clients, int(math.floor(client_sample_ratio * num_clients + 0.5))))


def _validate_partition(
    client_indices: Sequence[np.ndarray], batch_sizes: Sequence[int], client_sample_ratio: float
) -> tuple[list[np.ndarray], list[int]]:
    """Check the partition, batch sizes and ratio; return them as int64 arrays and ints."""
    if len(client_indices) == 0:
        raise UserError("the partition has no clients; set --num_client to at least 1")
    shards = []
    for client, indices in enumerate(client_indices):
        shard = np.asarray(indices)
        if shard.ndim != 1 or not (shard.size == 0 or np.issubdtype(shard.dtype, np.integer)):
            raise ValueError(f"client {client}: indices must be a 1-D integer array")
        if shard.size == 0:
            raise UserError(
                f"client {client} holds no samples; use fewer clients (--num_client) or a less skewed partition"
            )
        if shard.min() < 0:
            raise ValueError(f"client {client}: dataset indices must be non-negative")
        shards.append(shard.astype(np.int64, copy=False))
    if len(batch_sizes) != len(shards):
        raise ValueError(f"got {len(batch_sizes)} batch sizes for {len(shards)} clients")
    sizes = [int(size) for size in batch_sizes]
    if any(size < 1 for size in sizes):
        raise UserError(f"every client batch size must be at least 1, got {min(sizes)}; raise --batch_size")
    if not (0.0 < float(client_sample_ratio) <= 1.0):
        raise UserError(f"--client_sample_ratio must be in (0, 1], got {client_sample_ratio}")
    return shards, sizes


def default_steps_per_epoch(
    client_indices: Sequence[np.ndarray], batch_sizes: Sequence[int], client_sample_ratio: float
) -> int:
    """Steps in which the pool reads about as many rows as the dataset holds (at least one)."""
    shards, sizes = _validate_partition(client_indices, batch_sizes, client_sample_ratio)
    num_clients = len(shards)
    total_samples = sum(shard.size for shard in shards)
    # Each client is in a pool of k out of N with probability k/N, so that is the expected row share.
    expected_rows_per_step = pool_size_of(num_clients, client_sample_ratio) / num_clients * sum(sizes)
    return max(1, int(round(total_samples / expected_rows_per_step)))


class FederatedSchedule:
    """Which samples each client trains on at every step; a pure function of (seed, epoch, step)."""

    def __init__(
        self,
        client_indices: Sequence[np.ndarray],
        batch_sizes: Sequence[int],
        client_sample_ratio: float,
        steps_per_epoch: int,
        seed: int,
    ) -> None:
        self.client_indices, self.batch_sizes = _validate_partition(client_indices, batch_sizes, client_sample_ratio)
        if int(steps_per_epoch) < 1:
            raise UserError(f"steps per epoch must be at least 1, got {steps_per_epoch}")
        if not (0 <= int(seed) < 2**63):
            raise UserError(f"--seed must be a non-negative integer below 2**63, got {seed}")
        if len(self.client_indices) >= 2**_CLIENT_BITS:
            raise UserError(f"at most {2**_CLIENT_BITS - 1} clients are supported")
        self.num_clients = len(self.client_indices)
        self.client_sample_ratio = float(client_sample_ratio)
        self.steps_per_epoch = int(steps_per_epoch)
        self.seed = int(seed)
        self.pool_size = pool_size_of(self.num_clients, self.client_sample_ratio)
        self._key_offset = splitmix64_finalize(np.array([self.seed ^ 0x9E3779B97F4A7C15], dtype=np.uint64))[0]
        self._pools: dict[int, list[int]] = {}
        # _epochs_in_pool_before[e][c] = number of epochs before e in which client c trained.
        self._epochs_in_pool_before: list[np.ndarray] = [np.zeros(self.num_clients, dtype=np.int64)]
        # The last two passes of each client: enough for sequential reads, even when a batch wraps.
        self._pass_cache: list[dict[int, np.ndarray]] = [{} for _ in range(self.num_clients)]

    def pool(self, epoch: int) -> list[int]:
        """Clients sampled for `epoch` (keyed by (seed, epoch) only), ascending."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        cached = self._pools.get(epoch)
        if cached is not None:
            return list(cached)
        if self.pool_size == self.num_clients:
            clients = list(range(self.num_clients))
        else:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, _POOL_STREAM_TAG, epoch]))
            clients = sorted(int(c) for c in rng.choice(self.num_clients, size=self.pool_size, replace=False))
        self._pools[epoch] = clients
        return list(clients)

    def _pool_epochs_before(self, epoch: int) -> np.ndarray:
        """For every client, how many epochs before `epoch` it was in the pool (cached, extended once)."""
        if self.pool_size == self.num_clients:
            return np.full(self.num_clients, epoch, dtype=np.int64)
        while len(self._epochs_in_pool_before) <= epoch:
            previous_epoch = len(self._epochs_in_pool_before) - 1
            counts = self._epochs_in_pool_before[previous_epoch].copy()
            counts[self.pool(previous_epoch)] += 1
            self._epochs_in_pool_before.append(counts)
        return self._epochs_in_pool_before[epoch]

    def _check_step(self, epoch: int, step: int) -> None:
        """Reject an epoch or step outside the schedule."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if not (0 <= step < self.steps_per_epoch):
            raise ValueError(f"step must be in [0, {self.steps_per_epoch}), got {step}")

    def _pass_order(self, client: int, pass_number: int) -> np.ndarray:
        """The dataset indices of `client`'s shard in the order of pass `pass_number`."""
        cache = self._pass_cache[client]
        order = cache.get(pass_number)
        if order is None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, _PASS_STREAM_TAG, client, pass_number]))
            order = rng.permutation(self.client_indices[client])
            if len(cache) >= 2:
                del cache[min(cache)]
            cache[pass_number] = order
        return order

    def _stream_slice(self, client: int, start: int, length: int) -> np.ndarray:
        """Dataset indices at positions [start, start + length) of `client`'s endless stream."""
        shard_size = self.client_indices[client].size
        out = np.empty(length, dtype=np.int64)
        filled, position = 0, start
        while filled < length:
            pass_number, offset = divmod(position, shard_size)
            take = min(shard_size - offset, length - filled)
            out[filled : filled + take] = self._pass_order(client, pass_number)[offset : offset + take]
            filled += take
            position += take
        return out

    def sample_keys(self, client: int, start: int, length: int) -> np.ndarray:
        """Augmentation keys (uint64) of positions [start, start + length) of `client`'s stream."""
        if start + length >= 2**_POSITION_BITS:
            raise ValueError(f"stream position {start + length} exceeds the supported 2**{_POSITION_BITS}")
        positions = np.arange(start, start + length, dtype=np.uint64)
        packed = (np.uint64(client) << np.uint64(_POSITION_BITS)) | positions
        # Adding a seed-derived offset then mixing is a bijection, so keys never collide within a run.
        with np.errstate(over="ignore"):
            return splitmix64_finalize(packed + self._key_offset)

    def step_plan(
        self, epoch: int, step: int, clients: Sequence[int] | None = None
    ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(client, dataset indices, sample keys) of each pool client (or of the given subset) at (epoch, step)."""
        self._check_step(epoch, step)
        pool = self.pool(epoch)
        if clients is None:
            chosen = pool
        else:
            requested = [int(c) for c in clients]
            if len(set(requested)) != len(requested):
                raise ValueError(f"clients {requested} contain duplicates")
            outside = sorted(set(requested) - set(pool))
            if outside:
                raise ValueError(f"clients {outside} are not in the pool of epoch {epoch}: {pool}")
            chosen = sorted(requested)
        epochs_before = self._pool_epochs_before(epoch)
        plan = []
        for client in chosen:
            rows = self.batch_sizes[client]
            start = (int(epochs_before[client]) * self.steps_per_epoch + step) * rows
            plan.append((client, self._stream_slice(client, start, rows), self.sample_keys(client, start, rows)))
        return plan


def worker_user_error(error: UserError) -> UserError:
    """A UserError raised in a DataLoader worker as its own one line again.

    torch re-raises a worker's exception in the main process with the worker's whole traceback as its message;
    the exception's own message is that traceback's last line, after "UserError: ".
    """
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) < 2:
        return error
    last = lines[-1]
    marker = "UserError: "
    return UserError(last[last.index(marker) + len(marker):] if marker in last else last)


def normalise_uint8_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Float (B, 3, H, W) from uint8 (B, H, W, 3): scaled to [0, 1], then per-channel (x - mean) / std."""
    mean_tensor = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_tensor = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    as_float = images.permute(0, 3, 1, 2).float().div(255.0)
    return as_float.sub(mean_tensor).div(std_tensor).contiguous()


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    """Reject a per-channel mean/std that is not three numbers with positive std."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got {len(mean)} and {len(std)}")
    if any(float(s) <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {list(std)}")


def check_image_array(images: np.ndarray, labels: np.ndarray, name: str) -> None:
    """Reject images that are not uint8 (N, H, W, 3) or labels that are not one per image."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{name} labels must be 1-D with one label per image, got shape {labels.shape}")


class NormalisedImageLoader:
    """Re-iterable loader over a whole image array in fixed order: normalised float batches and labels."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        device: torch.device | None = None,
    ) -> None:
        check_image_array(images, labels, "evaluation")
        check_mean_std(mean, std)
        if batch_size < 1:
            raise UserError(f"evaluation batch size must be at least 1, got {batch_size}")
        # Kept as uint8 (4x smaller than float); each batch is normalised when it is read. Image files (an array
        # only in shape) stay undecoded until their batch is read.
        self.device = torch.device(device or "cpu")
        self.images = images if not isinstance(images, np.ndarray) else torch.from_numpy(
            np.ascontiguousarray(images)).to(self.device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device or "cpu")
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.batch_size = int(batch_size)

    @property
    def num_samples(self) -> int:
        """Number of images the loader covers."""
        return int(self.images.shape[0])

    def __len__(self) -> int:
        """Number of batches per pass."""
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (normalised images (B, 3, H, W), labels (B,)) in dataset order."""
        for start in range(0, self.num_samples, self.batch_size):
            stop = start + self.batch_size
            batch = self.images[start:stop]
            if isinstance(batch, np.ndarray):
                batch = torch.from_numpy(batch).to(self.device)
            yield normalise_uint8_images(batch, self.mean, self.std), self.labels[start:stop]
