"""SwAV Sinkhorn-Knopp, swapped prediction loss, metrics and queue checked against explicit formulas."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from forked_commands import START_METHOD
from torch import nn

from functions.core.errors import UserError
from functions.losses.swav import (
    EmbeddingQueue,
    code_entropy,
    embedding_std,
    prototypes_used,
    sinkhorn_knopp,
    swapped_prediction_loss,
)
from functions.methods.swav import normalize_prototypes_


def reference_sinkhorn(scores: list[list[float]], epsilon: float, iterations: int) -> list[list[float]]:
    """SwAV's Sinkhorn written with loops: normalise prototypes to 1/K, then samples to 1/B, per iteration; rows x B."""
    num_samples, num_prototypes = len(scores), len(scores[0])
    codes = [[math.exp(value / epsilon) for value in row] for row in scores]
    total = sum(sum(row) for row in codes)
    codes = [[value / total for value in row] for row in codes]
    for _ in range(iterations):
        for k in range(num_prototypes):
            column_sum = sum(codes[b][k] for b in range(num_samples))
            for b in range(num_samples):
                codes[b][k] = codes[b][k] / column_sum / num_prototypes
        for b in range(num_samples):
            row_sum = sum(codes[b])
            codes[b] = [value / row_sum / num_samples for value in codes[b]]
    return [[value * num_samples for value in row] for row in codes]


def _random_scores(rows: int, prototypes: int, seed: int) -> torch.Tensor:
    """Cosine-like scores uniform in [-1, 1]."""
    return torch.rand(rows, prototypes, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("scores", [[[0.3, -0.2], [0.1, 0.4]], [[0.3, -0.2], [0.1, 0.4], [-0.5, 0.0]]])
@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_matches_loop_reference(scores: list[list[float]], iterations: int) -> None:
    codes = sinkhorn_knopp(torch.tensor(scores), 0.5, iterations)
    expected = reference_sinkhorn(scores, 0.5, iterations)
    assert torch.allclose(codes, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_sinkhorn_without_iterations_is_row_softmax() -> None:
    scores = [[0.3, -0.2, 0.7], [0.1, 0.4, -0.1]]
    codes = sinkhorn_knopp(torch.tensor(scores), 0.5, 0)
    for row, code in zip(scores, codes.tolist()):
        weights = [math.exp(value / 0.5) for value in row]
        assert code == pytest.approx([weight / sum(weights) for weight in weights], rel=1e-5)


def test_sinkhorn_rows_sum_to_one_and_prototypes_are_equipartitioned() -> None:
    scores = _random_scores(64, 8, seed=0)
    codes = sinkhorn_knopp(scores, 0.05, 3)
    assert codes.dtype == torch.float32 and codes.shape == (64, 8)
    assert torch.allclose(codes.sum(dim=1), torch.ones(64), atol=1e-5)
    converged = sinkhorn_knopp(scores, 0.1, 200)
    assert torch.allclose(converged.sum(dim=0), torch.full((8,), 64 / 8), rtol=1e-3)
    # without equipartition (a plain softmax) the prototype masses are far from B/K for the same scores
    softmax_mass = torch.softmax(scores / 0.1, dim=1).sum(dim=0)
    assert (softmax_mass - 8).abs().max() > 0.5


def test_sinkhorn_is_invariant_to_constant_shifts() -> None:
    scores = _random_scores(16, 5, seed=1)
    codes = sinkhorn_knopp(scores, 0.05, 3)
    assert torch.allclose(sinkhorn_knopp(scores + 7.5, 0.05, 3), codes, atol=1e-5)
    # a constant per prototype is absorbed by the first prototype normalisation
    per_prototype = torch.tensor([0.0, 3.0, -2.0, 10.0, 0.5])
    assert torch.allclose(sinkhorn_knopp(scores + per_prototype, 0.05, 3), codes, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_sinkhorn_half_precision_large_scores_stay_finite(dtype: torch.dtype, scale: float) -> None:
    scores = (_random_scores(128, 3, seed=2) * scale).to(dtype)
    codes = sinkhorn_knopp(scores, 0.05, 3)
    assert codes.dtype == torch.float32
    assert torch.isfinite(codes).all()
    assert torch.allclose(codes.sum(dim=1), torch.ones(128), atol=1e-5)
    assert torch.allclose(codes, sinkhorn_knopp(scores.float(), 0.05, 3), atol=1e-5)


def test_sinkhorn_handles_sample_far_below_all_others() -> None:
    # exp((s - max) / eps) underflows for the whole last row in float32; the codes must stay valid.
    scores = torch.tensor([[1.0, 0.9], [0.9, 1.0], [-1.0, -0.9]]) * 30
    codes = sinkhorn_knopp(scores, 0.05, 3)
    assert torch.isfinite(codes).all()
    assert torch.allclose(codes.sum(dim=1), torch.ones(3), atol=1e-6)
    assert codes[2, 1] > codes[2, 0]  # its larger score still wins


def test_sinkhorn_runs_in_float32_under_autocast() -> None:
    scores = _random_scores(32, 4, seed=3) * 30
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        codes = sinkhorn_knopp(scores, 0.05, 3)
    assert codes.dtype == torch.float32
    assert torch.allclose(codes, sinkhorn_knopp(scores, 0.05, 3), atol=1e-6)


def test_sinkhorn_of_no_rows_is_empty() -> None:
    assert sinkhorn_knopp(torch.zeros(0, 4), 0.05, 3).shape == (0, 4)


def test_sinkhorn_rejects_bad_options() -> None:
    with pytest.raises(UserError):
        sinkhorn_knopp(torch.zeros(2, 2), 0.0, 3)
    with pytest.raises(UserError):
        sinkhorn_knopp(torch.zeros(2, 2), 0.05, -1)


def _init_gloo(store_file: Path, rank: int, world_size: int) -> None:
    """Start a gloo process group that meets through a file."""
    store = dist.FileStore(str(store_file), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)


def test_sinkhorn_distributed_single_process_equals_local(tmp_path: Path) -> None:
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    scores = _random_scores(20, 6, seed=4)
    _init_gloo(tmp_path / "store", 0, 1)
    try:
        distributed_codes = sinkhorn_knopp(scores, 0.05, 3, distributed=True)
    finally:
        dist.destroy_process_group()
    assert torch.allclose(distributed_codes, sinkhorn_knopp(scores, 0.05, 3), atol=1e-6)


def _sinkhorn_rank(rank: int, world_size: int, store_file: str, row_splits: list[int], out_dir: str) -> None:
    """One rank of the two-process test: codes of its own rows with the global equipartition."""
    _init_gloo(Path(store_file), rank, world_size)
    try:
        all_scores = _random_scores(sum(row_splits), 6, seed=5)
        own_scores = torch.split(all_scores, row_splits)[rank]
        torch.save(sinkhorn_knopp(own_scores, 0.05, 3, distributed=True), Path(out_dir) / f"codes_{rank}.pt")
    finally:
        dist.destroy_process_group()


# Uneven on purpose: B must be the all-reduced total; a rank without rows must still take part.
@pytest.mark.parametrize("row_splits", [[3, 5], [0, 4]])
def test_sinkhorn_two_processes_equal_one_process_on_all_rows(tmp_path: Path, row_splits: list[int]) -> None:
    # The ranks are forked from the tests' fork server (tests/helpers/forked_commands.py), which imported torch once.
    mp.start_processes(_sinkhorn_rank, args=(2, str(tmp_path / "store"), row_splits, str(tmp_path)), nprocs=2,
                       join=True, start_method=START_METHOD)
    gathered = torch.cat([torch.load(tmp_path / f"codes_{rank}.pt") for rank in range(2)])
    expected = sinkhorn_knopp(_random_scores(sum(row_splits), 6, seed=5), 0.05, 3)
    assert torch.allclose(gathered, expected, atol=1e-5)


def reference_swapped_loss(
    scores: list[list[list[float]]], codes: dict[int, list[list[float]]], temperature: float
) -> float:
    """Swapped prediction written with loops: per assignment crop, mean over other crops of mean_b -sum_k q log p."""
    num_crops = len(scores)
    total = 0.0
    for crop, crop_codes in codes.items():
        crop_loss = 0.0
        for other in range(num_crops):
            if other == crop:
                continue
            pair_loss = 0.0
            for code_row, score_row in zip(crop_codes, scores[other]):
                normaliser = sum(math.exp(value / temperature) for value in score_row)
                pair_loss -= sum(q * math.log(math.exp(s / temperature) / normaliser) for q, s in zip(code_row, score_row))
            crop_loss += pair_loss / len(crop_codes)
        total += crop_loss / (num_crops - 1)
    return total / len(codes)


def test_swapped_prediction_matches_loop_reference() -> None:
    scores = [
        [[0.2, -0.1, 0.5], [0.0, 0.3, -0.4]],
        [[-0.3, 0.6, 0.1], [0.4, 0.4, -0.2]],
        [[0.9, -0.5, 0.0], [-0.1, 0.2, 0.7]],
    ]
    codes = {0: [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], 1: [[0.3, 0.3, 0.4], [0.0, 1.0, 0.0]]}
    loss = swapped_prediction_loss(
        [torch.tensor(crop) for crop in scores], {crop: torch.tensor(value) for crop, value in codes.items()}, 0.5
    )
    assert loss.item() == pytest.approx(reference_swapped_loss(scores, codes, 0.5), rel=1e-5)


def test_swapped_prediction_near_zero_for_matching_sharp_predictions() -> None:
    winners = torch.tensor([0, 3, 1, 2, 3])
    sharp_scores = nn.functional.one_hot(winners, 4).float()  # cosine 1 for the winner, 0 elsewhere
    one_hot_codes = nn.functional.one_hot(sharp_scores.argmax(dim=1), 4).float()
    crops = [sharp_scores, sharp_scores.clone(), sharp_scores.clone()]
    loss = swapped_prediction_loss(crops, {0: one_hot_codes, 1: one_hot_codes}, 0.02)
    assert 0 <= loss.item() < 1e-6
    wrong_codes = nn.functional.one_hot((winners + 1) % 4, 4).float()
    assert swapped_prediction_loss([sharp_scores, sharp_scores], {0: wrong_codes}, 0.02).item() > 10


def test_swapped_prediction_gradient_and_dtype() -> None:
    scores = [_random_scores(4, 5, seed=seed).half().requires_grad_() for seed in (6, 7)]
    codes = {0: sinkhorn_knopp(scores[0], 0.05, 3)}
    loss = swapped_prediction_loss(scores, codes, 0.1)
    assert loss.dtype == torch.float32
    loss.backward()
    assert scores[1].grad is not None and scores[1].grad.abs().sum() > 0  # predicting crop receives gradient
    assert scores[0].grad is None  # crop 0 only provides the (constant) codes here


def test_code_entropy_uniform_and_one_hot() -> None:
    assert code_entropy(torch.full((6, 10), 0.1)).item() == pytest.approx(math.log(10), rel=1e-6)
    assert code_entropy(torch.eye(5)).item() == 0.0
    mixed = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert code_entropy(mixed).item() == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_prototypes_used_counts_distinct_argmax() -> None:
    codes = torch.zeros(4, 6)
    for row, winner in enumerate([0, 2, 2, 5]):
        codes[row, winner] = 0.9
        codes[row, (winner + 1) % 6] = 0.1
    assert int(prototypes_used(codes)) == 3
    assert int(prototypes_used(torch.eye(6))) == 6


def test_embedding_std_detects_collapse() -> None:
    identical = torch.tensor([[1.0, 2.0, 3.0]]).repeat(10, 1)
    assert embedding_std(identical).item() < 1e-6
    dim = 64
    gaussian = torch.randn(4096, dim, generator=torch.Generator().manual_seed(8))
    assert embedding_std(gaussian).item() == pytest.approx(1 / math.sqrt(dim), rel=0.05)
    assert embedding_std(gaussian * 50).item() == pytest.approx(embedding_std(gaussian).item(), rel=1e-5)


def test_normalize_prototypes_makes_unit_rows_with_same_direction() -> None:
    prototypes = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        prototypes.weight.copy_(torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    normalize_prototypes_(prototypes)
    expected = torch.tensor([[0.6, 0.8, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    assert torch.allclose(prototypes.weight, expected)


def _rows(values: list[float]) -> torch.Tensor:
    """A (len(values), 2) batch whose row i is [values[i], -values[i]], easy to recognise."""
    return torch.tensor([[value, -value] for value in values])


def test_embedding_queue_push_shifts_newest_first() -> None:
    queue = EmbeddingQueue(num_crops_for_assign=2, length=5, dim=2)
    assert not queue.is_full() and torch.equal(queue.embeddings, torch.zeros(2, 5, 2))
    queue.push(0, _rows([1, 2]))
    assert torch.equal(queue.embeddings[0], torch.cat([_rows([1, 2]), torch.zeros(3, 2)]))
    queue.push(0, _rows([3, 4]))
    assert torch.equal(queue.embeddings[0, :4], _rows([3, 4, 1, 2]))
    assert not queue.is_full(0)
    queue.push(0, _rows([5, 6]))
    assert torch.equal(queue.embeddings[0], _rows([5, 6, 3, 4, 1]))
    assert queue.is_full(0) and not queue.is_full(1) and not queue.is_full()
    assert torch.equal(queue.embeddings[1], torch.zeros(5, 2))  # slots are independent
    queue.push(1, _rows([9, 8, 7, 6, 5, 4, 3]))  # longer than the queue: its first rows are kept
    assert torch.equal(queue.embeddings[1], _rows([9, 8, 7, 6, 5]))
    assert queue.is_full()


def test_embedding_queue_push_detaches() -> None:
    queue = EmbeddingQueue(1, 3, 2)
    embeddings = torch.ones(2, 2, requires_grad=True)
    queue.push(0, embeddings * 2)
    assert not queue.embeddings.requires_grad
    assert torch.equal(queue.embeddings[0, :2], torch.full((2, 2), 2.0))


def test_embedding_queue_scores_with_queue() -> None:
    prototypes = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        prototypes.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    queue = EmbeddingQueue(1, 4, 2)
    batch_scores = torch.randn(2, 3, generator=torch.Generator().manual_seed(9), requires_grad=True)
    before_full = queue.scores_with_queue(0, batch_scores, prototypes)
    assert before_full.shape == (2, 3) and torch.equal(before_full, batch_scores.detach())

    queue.push(0, _rows([1, 2, 3, 4]))
    with_queue = queue.scores_with_queue(0, batch_scores, prototypes)
    assert with_queue.shape == (4 + 2, 3) and not with_queue.requires_grad
    # queue row [v, -v] scores [v, -v, 0] against the prototypes above
    expected_queue_scores = torch.tensor([[value, -value, 0.0] for value in (1.0, 2.0, 3.0, 4.0)])
    assert torch.allclose(with_queue[:4], expected_queue_scores)
    assert torch.equal(with_queue[4:], batch_scores.detach())  # batch rows last, so codes[-B:] are the batch's


def test_embedding_queue_state_round_trip() -> None:
    queue = EmbeddingQueue(2, 4, 3)
    queue.push(0, torch.randn(4, 3, generator=torch.Generator().manual_seed(10)))
    queue.push(1, torch.randn(2, 3, generator=torch.Generator().manual_seed(11)))
    restored = EmbeddingQueue(2, 4, 3)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.embeddings, queue.embeddings)
    assert restored.is_full(0) and not restored.is_full(1)
    new_rows = torch.randn(2, 3, generator=torch.Generator().manual_seed(12))
    queue.push(1, new_rows)
    restored.push(1, new_rows)
    assert torch.equal(restored.embeddings, queue.embeddings) and restored.is_full() and queue.is_full()
    with pytest.raises(UserError):
        EmbeddingQueue(2, 8, 3).load_state_dict(queue.state_dict())
