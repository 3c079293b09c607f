"""Tests of the federated step schedule, StepBatch and the in-memory evaluation loader."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sfl_helpers import moco_trainer

from functions.core.errors import UserError
from functions.data.loaders import (
    FederatedSchedule,
    NormalisedImageLoader,
    StepBatch,
    default_steps_per_epoch,
    normalise_uint8_images,
    worker_user_error,
)


def iid_partition(num_samples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Disjoint equal shards of a random permutation, each sorted."""
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(shard).astype(np.int64) for shard in np.array_split(order, num_clients)]


def client_stream(schedule: FederatedSchedule, client: int, num_epochs: int) -> np.ndarray:
    """Everything `client` read over the first epochs, concatenated in step order."""
    pieces = []
    for epoch in range(num_epochs):
        if client not in schedule.pool(epoch):
            continue
        for step in range(schedule.steps_per_epoch):
            (plan,) = schedule.step_plan(epoch, step, clients=[client])
            pieces.append(plan[1])
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)


def assert_stream_is_passes(stream: np.ndarray, shard: np.ndarray) -> None:
    """Every complete block of len(shard) stream entries is exactly the shard, each index once."""
    size = shard.size
    for start in range(0, stream.size - size + 1, size):
        np.testing.assert_array_equal(np.sort(stream[start : start + size]), shard)
    assert np.isin(stream, shard).all()


def test_one_pass_gives_each_client_exactly_its_shard() -> None:
    shards = iid_partition(160, 4)
    schedule = FederatedSchedule(shards, [8] * 4, 1.0, steps_per_epoch=5, seed=3)
    seen = {client: [] for client in range(4)}
    for step in range(5):
        plan = schedule.step_plan(0, step)
        assert [client for client, _, _ in plan] == [0, 1, 2, 3]
        for client, indices, keys in plan:
            assert indices.shape == (8,) and keys.shape == (8,) and keys.dtype == np.uint64
            assert np.isin(indices, shards[client]).all()
            seen[client].append(indices)
    for client in range(4):
        collected = np.concatenate(seen[client])
        np.testing.assert_array_equal(np.sort(collected), shards[client])


def test_stream_continues_across_epochs_when_passes_and_epochs_do_not_align() -> None:
    shards = iid_partition(120, 3)
    schedule = FederatedSchedule(shards, [8] * 3, 1.0, steps_per_epoch=3, seed=1)
    for client in range(3):
        stream = client_stream(schedule, client, num_epochs=4)  # 12 steps x 8 rows = 2.4 passes
        assert stream.size == 96
        assert_stream_is_passes(stream, shards[client])
        # A new pass is a fresh shuffle, not a repeat of the previous one.
        assert not np.array_equal(stream[:40], stream[40:80])


def test_client_smaller_than_its_batch_wraps_through_passes() -> None:
    shards = [np.array([5, 9, 11], dtype=np.int64), np.arange(20, 40, dtype=np.int64)]
    schedule = FederatedSchedule(shards, [8, 4], 1.0, steps_per_epoch=4, seed=0)
    stream = client_stream(schedule, 0, num_epochs=3)
    assert stream.size == 8 * 12
    assert_stream_is_passes(stream, shards[0])
    orders = {tuple(stream[start : start + 3]) for start in range(0, stream.size - 2, 3)}
    assert len(orders) > 1


def test_stream_skips_nothing_while_a_client_is_out_of_the_pool() -> None:
    shards = iid_partition(200, 10)
    schedule = FederatedSchedule(shards, [6] * 10, 0.3, steps_per_epoch=2, seed=5)
    for client in range(10):
        epochs_in = [epoch for epoch in range(12) if client in schedule.pool(epoch)]
        stream = client_stream(schedule, client, num_epochs=12)
        assert stream.size == len(epochs_in) * 2 * 6
        assert_stream_is_passes(stream, shards[client])


@pytest.mark.parametrize("num_clients,ratio", [(10, 0.3), (10, 0.04), (20, 0.25), (10, 1.0), (7, 0.3)])
def test_pool_size_and_order(num_clients: int, ratio: float) -> None:
    shards = iid_partition(num_clients * 5, num_clients)
    schedule = FederatedSchedule(shards, [2] * num_clients, ratio, steps_per_epoch=2, seed=4)
    expected_size = max(1, round(ratio * num_clients))
    for epoch in range(6):
        pool = schedule.pool(epoch)
        assert len(pool) == expected_size
        assert pool == sorted(set(pool))
        assert all(0 <= client < num_clients for client in pool)


def test_pool_is_keyed_by_seed_and_epoch_only_and_changes_across_epochs() -> None:
    shards = iid_partition(100, 10)
    first = FederatedSchedule(shards, [5] * 10, 0.3, steps_per_epoch=2, seed=11)
    other_layout = FederatedSchedule(shards, [3] * 10, 0.3, steps_per_epoch=9, seed=11)
    other_seed = FederatedSchedule(shards, [5] * 10, 0.3, steps_per_epoch=2, seed=12)
    pools = [first.pool(epoch) for epoch in range(10)]
    assert [other_layout.pool(epoch) for epoch in reversed(range(10))] == pools[::-1]
    assert len({tuple(pool) for pool in pools}) > 1
    assert [other_seed.pool(epoch) for epoch in range(10)] != pools


def test_step_plan_needs_no_state_so_resume_is_exact() -> None:
    shards = iid_partition(90, 6)
    sizes = [4, 7, 3, 5, 6, 2]
    consumed = FederatedSchedule(shards, sizes, 0.5, steps_per_epoch=3, seed=2)
    reference = {}
    for epoch in range(5):
        for step in range(3):
            reference[(epoch, step)] = consumed.step_plan(epoch, step)
    rng = np.random.default_rng(0)
    points = list(reference)
    for order in rng.permutation(len(points)):
        epoch, step = points[order]
        fresh = FederatedSchedule(shards, sizes, 0.5, steps_per_epoch=3, seed=2)
        for expected, got in zip(reference[(epoch, step)], fresh.step_plan(epoch, step), strict=True):
            assert expected[0] == got[0]
            np.testing.assert_array_equal(expected[1], got[1])
            np.testing.assert_array_equal(expected[2], got[2])
        # The consumed object, asked again out of order, still agrees.
        again = consumed.step_plan(epoch, step)
        assert [c for c, _, _ in again] == [c for c, _, _ in reference[(epoch, step)]]
        for expected, got in zip(reference[(epoch, step)], again, strict=True):
            np.testing.assert_array_equal(expected[1], got[1])


def test_sample_keys_are_unique_across_clients_and_positions_and_depend_on_seed() -> None:
    shards = [np.arange(0, 3), np.arange(3, 40), np.arange(40, 60)]
    keys_by_seed = {}
    for seed in (0, 1):
        schedule = FederatedSchedule(shards, [5, 5, 5], 1.0, steps_per_epoch=4, seed=seed)
        keys = [plan[2] for epoch in range(3) for step in range(4) for plan in schedule.step_plan(epoch, step)]
        all_keys = np.concatenate(keys)
        assert all_keys.dtype == np.uint64
        assert np.unique(all_keys).size == all_keys.size == 3 * 4 * 3 * 5
        keys_by_seed[seed] = set(all_keys.tolist())
    assert not keys_by_seed[0] & keys_by_seed[1]


def test_sample_keys_follow_the_stream_position_not_the_step_layout() -> None:
    shards = iid_partition(64, 2)
    one_batch = FederatedSchedule(shards, [8, 8], 1.0, steps_per_epoch=4, seed=9)
    half_batch = FederatedSchedule(shards, [4, 4], 1.0, steps_per_epoch=8, seed=9)
    for client in range(2):
        coarse = np.concatenate([one_batch.step_plan(0, step, [client])[0][2] for step in range(4)])
        fine = np.concatenate([half_batch.step_plan(0, step, [client])[0][2] for step in range(8)])
        np.testing.assert_array_equal(coarse, fine)


def test_client_subset_returns_the_rows_of_the_full_plan() -> None:
    shards = iid_partition(120, 8)
    schedule = FederatedSchedule(shards, [3, 4, 5, 6, 3, 4, 5, 6], 0.5, steps_per_epoch=3, seed=6)
    for epoch in range(3):
        pool = schedule.pool(epoch)
        full = {client: (indices, keys) for client, indices, keys in schedule.step_plan(epoch, 1)}
        subset = [pool[3], pool[0]]
        plan = schedule.step_plan(epoch, 1, clients=subset)
        assert [client for client, _, _ in plan] == sorted(subset)
        for client, indices, keys in plan:
            np.testing.assert_array_equal(indices, full[client][0])
            np.testing.assert_array_equal(keys, full[client][1])
        outsider = next(client for client in range(8) if client not in pool)
        with pytest.raises(ValueError, match="not in the pool"):
            schedule.step_plan(epoch, 1, clients=[outsider])


def test_unequal_batch_sizes_give_matching_row_counts() -> None:
    shards = iid_partition(100, 4)
    sizes = [1, 3, 7, 12]
    schedule = FederatedSchedule(shards, sizes, 1.0, steps_per_epoch=5, seed=0)
    for step in range(5):
        plan = schedule.step_plan(0, step)
        assert [indices.size for _, indices, _ in plan] == sizes
        assert [keys.size for _, _, keys in plan] == sizes


def test_default_steps_per_epoch_reads_about_the_dataset_once() -> None:
    shards = iid_partition(1000, 10)
    assert default_steps_per_epoch(shards, [10] * 10, 1.0) == 1000 // (10 * 10)
    # Five of ten clients per step read 50 rows, so 1000 samples take 20 steps.
    assert default_steps_per_epoch(shards, [10] * 10, 0.5) == 20
    assert default_steps_per_epoch([np.arange(3)], [64], 1.0) == 1


@pytest.mark.parametrize(
    "shards,sizes,ratio,steps,seed",
    [
        ([np.arange(4)], [2], 0.0, 2, 0),
        ([np.arange(4)], [2], 1.5, 2, 0),
        ([np.arange(4)], [0], 1.0, 2, 0),
        ([np.arange(4), np.array([], dtype=np.int64)], [2, 2], 1.0, 2, 0),
        ([np.arange(4)], [2], 1.0, 0, 0),
        ([np.arange(4)], [2], 1.0, 2, -1),
    ],
)
def test_bad_user_settings_raise_user_error(shards, sizes, ratio, steps, seed) -> None:
    with pytest.raises(UserError):
        FederatedSchedule(shards, sizes, ratio, steps_per_epoch=steps, seed=seed)


def test_step_outside_the_epoch_is_rejected() -> None:
    schedule = FederatedSchedule([np.arange(10)], [2], 1.0, steps_per_epoch=3, seed=0)
    with pytest.raises(ValueError):
        schedule.step_plan(0, 3)
    with pytest.raises(ValueError):
        schedule.step_plan(-1, 0)


def test_step_batch_checks_rows_and_moves_crops() -> None:
    crops = [torch.zeros(5, 3, 8, 8), torch.ones(5, 3, 4, 4)]
    batch = StepBatch(crops, client_ids=[0, 2], rows_per_client=[2, 3], sample_indices=torch.arange(5))
    moved = batch.to(torch.device("cpu"), non_blocking=False)
    assert moved.num_rows == 5 and moved.client_ids == [0, 2] and moved.rows_per_client == [2, 3]
    assert all(torch.equal(a, b) for a, b in zip(moved.crops, crops))
    with pytest.raises(ValueError):
        StepBatch([torch.zeros(4, 3, 8, 8)], client_ids=[0, 2], rows_per_client=[2, 3], sample_indices=torch.arange(5))


def test_normalised_image_loader_covers_every_image_once_in_order() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(23, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=23).astype(np.int64)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    loader = NormalisedImageLoader(images, labels, mean, std, batch_size=10)
    assert len(loader) == math.ceil(23 / 10)
    for _ in range(2):  # re-iterable
        batches = list(loader)
        assert [x.shape[0] for x, _ in batches] == [10, 10, 3]
        got_images = torch.cat([x for x, _ in batches]).numpy()
        got_labels = torch.cat([y for _, y in batches]).numpy()
        expected = (images.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
        assert got_images.dtype == np.float32
        np.testing.assert_allclose(got_images, expected.transpose(0, 3, 1, 2), atol=1e-5)
        np.testing.assert_array_equal(got_labels, labels)


def test_normalise_uint8_images_matches_channel_formula() -> None:
    images = torch.tensor([[[[0, 255, 51]]]], dtype=torch.uint8)  # one 1x1 image
    out = normalise_uint8_images(images, (0.0, 0.5, 0.1), (1.0, 0.5, 0.1))
    assert out.shape == (1, 3, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 1.0, 1.0]))


def test_a_batch_larger_than_a_shard_wraps_with_distinct_augmentations():
    # Documented behaviour, not an error: a client reads its shard as an endless stream, so a batch wraps around.
    schedule = FederatedSchedule([np.array([3, 7, 9]), np.arange(10, 30)], [8, 8], 1.0, steps_per_epoch=2, seed=0)
    (client, indices, keys), _ = schedule.step_plan(0, 0)
    assert client == 0 and len(indices) == 8
    assert set(indices.tolist()) == {3, 7, 9} and np.bincount(indices).max() >= 3
    assert len(set(keys.tolist())) == 8  # every repeat is its own stream position, so its own augmentation
    for start in range(0, 6, 3):  # each full pass over the shard is a permutation of it
        assert sorted(indices[start:start + 3].tolist()) == [3, 7, 9]


def test_a_batch_larger_than_a_shard_is_announced_and_trains(tmp_path):
    import logging

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("sfl")
    handler = Collect()
    logger.addHandler(handler)
    try:
        trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "4", "--batch_size", "160")
    finally:
        logger.removeHandler(handler)
    assert any("4 of 4 clients hold fewer samples than their batch (smallest: 128 samples, batch 160)" in message
               for message in records), records
    batch = next(trainer.data.loaders.train.epoch(0))
    assert batch.rows_per_client == [160] * 4
    loss, _ = trainer.train_step(batch)
    assert torch.isfinite(loss)


def test_a_worker_user_error_is_its_own_line_again() -> None:
    wrapped = UserError("Caught UserError in DataLoader worker process 1.\n"
                        "Original Traceback (most recent call last):\n"
                        '  File "x.py", line 3, in decode\n    raise UserError(...)\n'
                        "functions.core.errors.UserError: cannot decode a.jpg (broken); remove it\n")
    assert str(worker_user_error(wrapped)) == "cannot decode a.jpg (broken); remove it"
    in_process = UserError("cannot decode a.jpg (broken); remove it")
    assert worker_user_error(in_process) is in_process
