"""MoCo losses, key queue and momentum update checked against explicit formulas."""
from __future__ import annotations

import math

import pytest
import torch
from moco_reference import reference_info_nce, unit
from torch import nn

from functions.core.errors import UserError
from functions.losses.moco import KeyQueue, info_nce_loss, symmetric_info_nce_loss
from functions.sfl.clients.loop import momentum_update_

# Two queries (not unit length), their keys, and two unit negatives. Row 0's key is close to its query
# (hit); row 1's key is far from its query while negative 1 is close to it (miss).
QUERIES = [[2.0, 0.0, 1.0], [0.0, 3.0, 0.5]]
KEYS = [[1.5, 0.2, 0.9], [1.0, -1.0, 0.0]]
NEGATIVES = [unit([0.0, 0.0, 1.0]), unit([0.1, 1.0, 0.0])]


def test_info_nce_matches_per_row_formula() -> None:
    loss, accuracy = info_nce_loss(torch.tensor(QUERIES), torch.tensor(KEYS), torch.tensor(NEGATIVES), 0.5)
    expected_loss, expected_accuracy = reference_info_nce(QUERIES, KEYS, NEGATIVES, 0.5)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy.item() == pytest.approx(expected_accuracy)
    assert expected_accuracy == 0.5  # the case really has one hit and one miss


def test_info_nce_accuracy_one_when_key_is_query_and_negatives_orthogonal() -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.zeros(6, 4)
    queries[:, :2] = torch.randn(6, 2, generator=generator)  # queries live in span(e0, e1)
    negatives = torch.eye(4)[2:]  # e2, e3: orthogonal to every query
    loss, accuracy = info_nce_loss(queries, queries.clone(), negatives, 0.1)
    assert accuracy.item() == 1.0
    # logits are [1/T, 0, 0] for every row, so the loss is known in closed form
    assert loss.item() == pytest.approx(-math.log(math.exp(10.0) / (math.exp(10.0) + 2.0)), abs=1e-6)


def test_info_nce_gradient_reaches_query_but_not_key_or_negatives() -> None:
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(4, 8, generator=generator, requires_grad=True)
    key = torch.randn(4, 8, generator=generator, requires_grad=True)
    negatives = torch.nn.functional.normalize(torch.randn(16, 8, generator=generator), dim=1).requires_grad_()
    loss, _ = info_nce_loss(query, key, negatives, 0.2)
    loss.backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    assert key.grad is None
    assert negatives.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_info_nce_runs_in_float32_for_half_inputs(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(8, 16, generator=generator).to(dtype)
    key = torch.randn(8, 16, generator=generator).to(dtype)
    negatives = torch.nn.functional.normalize(torch.randn(32, 16, generator=generator), dim=1).to(dtype)
    # T = 0.01 makes exp(logit) far beyond the fp16 range; float32 inside keeps the loss finite.
    loss, accuracy = info_nce_loss(query, key, negatives, 0.01)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected, _ = info_nce_loss(query.float(), key.float(), negatives.float(), 0.01)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0.0 <= accuracy.item() <= 1.0


def test_info_nce_rejects_non_positive_temperature() -> None:
    with pytest.raises(UserError):
        info_nce_loss(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.0)


def test_symmetric_loss_is_sum_of_swapped_terms_with_mean_accuracy() -> None:
    q1, k1 = QUERIES, KEYS
    q2 = [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    k2 = [[0.1, 0.0, 1.0], [1.0, 0.9, 1.2]]
    loss, accuracy = symmetric_info_nce_loss(
        torch.tensor(q1), torch.tensor(k1), torch.tensor(q2), torch.tensor(k2), torch.tensor(NEGATIVES), 0.5
    )
    loss_12, accuracy_12 = reference_info_nce(q1, k2, NEGATIVES, 0.5)
    loss_21, accuracy_21 = reference_info_nce(q2, k1, NEGATIVES, 0.5)
    assert loss.item() == pytest.approx(loss_12 + loss_21, rel=1e-5)
    assert accuracy.item() == pytest.approx((accuracy_12 + accuracy_21) / 2)
    assert accuracy_12 != accuracy_21  # the mean is really exercised


def test_key_queue_starts_with_reproducible_random_unit_rows() -> None:
    first = KeyQueue(10, 4, generator=torch.Generator().manual_seed(3))
    second = KeyQueue(10, 4, generator=torch.Generator().manual_seed(3))
    other = KeyQueue(10, 4, generator=torch.Generator().manual_seed(4))
    assert first.negatives.shape == (10, 4) and first.pointer == 0
    assert torch.allclose(first.negatives.norm(dim=1), torch.ones(10))
    assert torch.equal(first.negatives, second.negatives)
    assert not torch.equal(first.negatives, other.negatives)


def test_key_queue_writes_normalised_keys_at_pointer_and_wraps() -> None:
    queue = KeyQueue(5, 2, generator=torch.Generator().manual_seed(5))
    initial = queue.negatives.clone()
    batch_a = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    queue.enqueue(batch_a)
    assert queue.pointer == 2
    assert torch.allclose(queue.negatives[0], torch.tensor([0.6, 0.8]))
    assert torch.allclose(queue.negatives[1], torch.tensor([0.0, 1.0]))
    assert torch.equal(queue.negatives[2:], initial[2:])

    batch_b = torch.tensor([[1.0, 0.0], [0.0, -1.0], [-1.0, 0.0], [5.0, 0.0]])
    queue.enqueue(batch_b)  # rows 2, 3, 4, then wraps to row 0
    assert queue.pointer == 1
    assert torch.allclose(queue.negatives[2], torch.tensor([1.0, 0.0]))
    assert torch.allclose(queue.negatives[3], torch.tensor([0.0, -1.0]))
    assert torch.allclose(queue.negatives[4], torch.tensor([-1.0, 0.0]))
    assert torch.allclose(queue.negatives[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(queue.negatives[1], torch.tensor([0.0, 1.0]))  # batch A's second key survives


def test_key_queue_batch_larger_than_queue_keeps_newest_keys() -> None:
    size, count, start = 3, 7, 1
    queue = KeyQueue(size, 2, generator=torch.Generator().manual_seed(6))
    queue.enqueue(torch.tensor([[1.0, 1.0]]))  # move the pointer to 1
    keys = torch.stack([torch.tensor([math.cos(angle), math.sin(angle)]) for angle in range(count)])
    queue.enqueue(keys)
    # Writing one key at a time from row `start`: row (start + j) % size ends up with the last such j.
    expected = {}
    for j in range(count):
        expected[(start + j) % size] = keys[j]
    for row, key in expected.items():
        assert torch.allclose(queue.negatives[row], key, atol=1e-6)
    assert queue.pointer == (start + count) % size


def test_key_queue_state_round_trip_continues_identically() -> None:
    queue = KeyQueue(6, 3, generator=torch.Generator().manual_seed(7))
    queue.enqueue(torch.randn(4, 3, generator=torch.Generator().manual_seed(8)))
    state = queue.state_dict()
    restored = KeyQueue(6, 3, generator=torch.Generator().manual_seed(9))
    restored.load_state_dict(state)
    assert torch.equal(restored.negatives, queue.negatives) and restored.pointer == queue.pointer == 4

    more_keys = torch.randn(5, 3, generator=torch.Generator().manual_seed(10))
    queue.enqueue(more_keys)
    restored.enqueue(more_keys)
    assert torch.equal(restored.negatives, queue.negatives) and restored.pointer == queue.pointer
    assert not torch.equal(state["negatives"], queue.negatives)  # the saved state is a copy, not a view


def test_key_queue_rejects_checkpoint_of_other_size() -> None:
    with pytest.raises(UserError):
        KeyQueue(6, 3).load_state_dict(KeyQueue(8, 3).state_dict())


def _small_network() -> nn.Module:
    """A linear layer and a BatchNorm, so there are both parameters and buffers."""
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_momentum_update_follows_formula_and_copies_buffers() -> None:
    torch.manual_seed(11)
    target, source = _small_network(), _small_network()
    source(torch.randn(8, 3))  # train-mode forward changes the source's running statistics
    target_before = {name: tensor.clone() for name, tensor in target.state_dict().items()}
    source_before = {name: tensor.clone() for name, tensor in source.state_dict().items()}
    momentum = 0.9
    momentum_update_(target, source, momentum)
    for name, parameter in target.named_parameters():
        expected = momentum * target_before[name] + (1 - momentum) * source_before[name]
        assert torch.allclose(parameter, expected, rtol=0, atol=1e-7), name
    for name, buffer in target.named_buffers():
        assert torch.equal(buffer, source_before[name]), name
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, source_before[name]), f"source changed: {name}"


def test_momentum_update_extremes() -> None:
    torch.manual_seed(12)
    target, source = _small_network(), _small_network()
    target_weight = target[0].weight.clone()
    momentum_update_(target, source, 1.0)
    assert torch.equal(target[0].weight, target_weight)
    momentum_update_(target, source, 0.0)
    assert torch.equal(target[0].weight, source[0].weight)
    with pytest.raises(UserError):
        momentum_update_(target, source, 1.5)
