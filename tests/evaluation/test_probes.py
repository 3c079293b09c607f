"""Tests of the evaluation monitors: kNN, feature extraction, linear and semi-supervised probes."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from functions.core.errors import UserError
from functions.evaluation.probes import (
    extract_features,
    knn_accuracy,
    knn_predict,
    label_subset,
    linear_probe,
    semi_supervised_probes,
)


def clustered_features(
    num_per_class: int, num_classes: int, dim: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class centres on the unit sphere plus Gaussian noise; labels in class-major order."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    features = centres[labels] + noise * torch.randn(labels.numel(), dim, generator=generator)
    return features, labels


def train_test_clusters(
    noise: float, dim: int = 32, num_classes: int = 5, train_per_class: int = 100, test_per_class: int = 40
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test sets drawn around the same class centres."""
    generator = torch.Generator().manual_seed(123)
    centres = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    train_labels = torch.arange(num_classes).repeat_interleave(train_per_class)
    test_labels = torch.arange(num_classes).repeat_interleave(test_per_class)
    train = centres[train_labels] + noise * torch.randn(train_labels.numel(), dim, generator=generator)
    test = centres[test_labels] + noise * torch.randn(test_labels.numel(), dim, generator=generator)
    return train, train_labels, test, test_labels


# ---------------------------------------------------------------- kNN


def test_knn_separates_clustered_features() -> None:
    train, train_labels, test, test_labels = train_test_clusters(noise=0.05)
    assert knn_accuracy(train, train_labels, test, test_labels, num_classes=5, k=20) == pytest.approx(100.0)


def test_knn_with_random_labels_is_near_chance() -> None:
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(2000, 16, generator=generator)
    test = torch.randn(2000, 16, generator=generator)
    train_labels = torch.randint(0, 10, (2000,), generator=generator)
    test_labels = torch.randint(0, 10, (2000,), generator=generator)
    accuracy = knn_accuracy(train, train_labels, test, test_labels, num_classes=10, k=50)
    assert abs(accuracy - 10.0) < 4.0


def hand_knn_scores(train: list[list[float]], labels: list[int], test: list[list[float]], num_classes: int, k: int,
                    temperature: float) -> list[list[float]]:
    """The weighted kNN vote written out with plain Python loops."""
    scores = []
    for query in test:
        similarities = []
        for index, point in enumerate(train):
            dot = sum(q * p for q, p in zip(query, point))
            norm = math.sqrt(sum(q * q for q in query)) * math.sqrt(sum(p * p for p in point))
            similarities.append((dot / norm, index))
        similarities.sort(reverse=True)
        votes = [0.0] * num_classes
        for similarity, index in similarities[: min(k, len(train))]:
            votes[labels[index]] += math.exp(similarity / temperature)
        scores.append(votes)
    return scores


TINY_TRAIN = [[1.0, 0.0], [0.9, 0.3], [0.0, 2.0], [-1.0, 0.2], [0.5, -1.0]]
TINY_LABELS = [0, 1, 1, 2, 0]
TINY_TEST = [[1.0, 0.1], [-0.3, 1.0], [0.2, -0.9]]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_knn_scores_match_hand_computed_vote(k: int) -> None:
    expected = torch.tensor(hand_knn_scores(TINY_TRAIN, TINY_LABELS, TINY_TEST, 3, k, 0.5), dtype=torch.float64)
    scores = knn_predict(torch.tensor(TINY_TRAIN), torch.tensor(TINY_LABELS), torch.tensor(TINY_TEST),
                         num_classes=3, k=k, temperature=0.5)
    assert scores.shape == (3, 3)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


def test_knn_k_larger_than_train_set_uses_every_train_point() -> None:
    expected = torch.tensor(hand_knn_scores(TINY_TRAIN, TINY_LABELS, TINY_TEST, 3, 5, 0.1), dtype=torch.float64)
    scores = knn_predict(torch.tensor(TINY_TRAIN), torch.tensor(TINY_LABELS), torch.tensor(TINY_TEST),
                         num_classes=3, k=200, temperature=0.1)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)
    accuracy = knn_accuracy(torch.tensor(TINY_TRAIN), torch.tensor(TINY_LABELS), torch.tensor(TINY_TEST),
                            torch.tensor([0, 1, 0]), num_classes=3, k=200)
    hand_predictions = [max(range(3), key=row.__getitem__) for row in expected.tolist()]
    assert accuracy == pytest.approx(100.0 * sum(p == t for p, t in zip(hand_predictions, [0, 1, 0])) / 3)


def test_knn_chunking_matches_single_chunk() -> None:
    train, train_labels, test, _ = train_test_clusters(noise=0.8)
    whole = knn_predict(train, train_labels, test, num_classes=5, k=15, chunk_size=10_000)
    chunked = knn_predict(train, train_labels, test, num_classes=5, k=15, chunk_size=7)
    # Block sizes change the float32 summation order of the similarities only.
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0.0)
    assert torch.equal(chunked.argmax(dim=1), whole.argmax(dim=1))


def test_knn_uses_cosine_similarity() -> None:
    train, train_labels, test, _ = train_test_clusters(noise=0.5)
    scale = torch.linspace(0.5, 4.0, test.shape[0]).unsqueeze(1)
    torch.testing.assert_close(
        knn_predict(train, train_labels, test * scale, num_classes=5, k=10),
        knn_predict(F.normalize(train, dim=1), train_labels, test, num_classes=5, k=10),
        rtol=1e-5, atol=0.0,
    )


@pytest.mark.parametrize("options", [{"k": 0}, {"temperature": 0.0}, {"chunk_size": 0}])
def test_knn_rejects_bad_options(options: dict) -> None:
    train, train_labels, test, _ = train_test_clusters(noise=0.1)
    with pytest.raises(UserError):
        knn_predict(train, train_labels, test, num_classes=5, **options)


def test_knn_rejects_labels_beyond_num_classes() -> None:
    train, train_labels, test, _ = train_test_clusters(noise=0.1)
    with pytest.raises(UserError, match="num_classes"):
        knn_predict(train, train_labels, test, num_classes=3)


# ---------------------------------------------------------------- feature extraction


def image_batches(num_batches: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of (images, labels) batches shaped like normalised CIFAR."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 3, 32, 32, generator=generator), torch.randint(0, 10, (batch_size,), generator=generator))
        for _ in range(num_batches)
    ]


def test_extract_features_keeps_order_normalises_and_returns_labels() -> None:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    batches = image_batches(num_batches=3, batch_size=5, seed=2)
    all_images = torch.cat([images for images, _ in batches])
    all_labels = torch.cat([labels for _, labels in batches])

    features, labels = extract_features(encoder, batches, torch.device("cpu"))
    with torch.no_grad():
        expected = F.normalize(encoder(all_images), dim=1)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert labels.dtype == torch.int64
    assert torch.equal(labels, all_labels)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(15))

    raw, _ = extract_features(encoder, batches, torch.device("cpu"), normalize=False)
    with torch.no_grad():
        torch.testing.assert_close(raw, encoder(all_images))


def test_extract_features_flattens_pooled_maps_and_runs_without_grad() -> None:
    encoder = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1))  # (B, 6, 1, 1)
    features, _ = extract_features(encoder, image_batches(2, 4, seed=3), torch.device("cpu"), progress=True)
    assert features.shape == (8, 6)
    assert not features.requires_grad


def test_extract_features_with_autocast_returns_float32() -> None:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8))
    batches = image_batches(2, 4, seed=4)
    full, _ = extract_features(encoder, batches, torch.device("cpu"))
    reduced, _ = extract_features(encoder, batches, torch.device("cpu"), autocast_dtype=torch.bfloat16)
    assert reduced.dtype == torch.float32
    torch.testing.assert_close(reduced, full, atol=0.05, rtol=0.05)


def test_extract_features_rejects_empty_loader() -> None:
    with pytest.raises(UserError):
        extract_features(nn.Flatten(), [], torch.device("cpu"))


# ---------------------------------------------------------------- linear probe


def test_linear_probe_learns_separable_features() -> None:
    train, train_labels, test, test_labels = train_test_clusters(noise=0.15, dim=24)
    result = linear_probe(train, train_labels, test, test_labels, num_classes=5, epochs=20, batch_size=64)
    assert result["test_acc"] > 95.0
    assert result["train_acc"] > 95.0
    assert result["epochs"] == 20


def test_linear_probe_reports_final_epoch_not_best() -> None:
    train, train_labels, test, test_labels = train_test_clusters(noise=0.15, dim=24)
    epochs = 6
    seen_epochs: list[int] = []

    def break_classifier_at_the_end(epoch: int, classifier: nn.Module) -> None:
        """Record epochs; after the last one force the classifier to answer class 0 for everything."""
        seen_epochs.append(epoch)
        if epoch == epochs - 1:
            with torch.no_grad():
                classifier.weight.zero_()
                classifier.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))

    result = linear_probe(train, train_labels, test, test_labels, num_classes=5, epochs=epochs, batch_size=64,
                          on_epoch_end=break_classifier_at_the_end)
    assert seen_epochs == list(range(epochs))
    # The earlier epochs scored near 100 %; only class 0 (one fifth of each set) is right now.
    assert result["test_acc"] == pytest.approx(100.0 * (test_labels == 0).float().mean().item())
    assert result["train_acc"] == pytest.approx(100.0 * (train_labels == 0).float().mean().item())


def final_weights(seed: int, features: tuple) -> tuple[dict, torch.Tensor]:
    """Run a short probe and return its result and its final weight matrix."""
    captured: dict[str, torch.Tensor] = {}

    def keep_weights(epoch: int, classifier: nn.Module) -> None:
        captured["weight"] = classifier.weight.detach().clone()

    result = linear_probe(*features, num_classes=5, epochs=3, batch_size=32, seed=seed, on_epoch_end=keep_weights)
    return result, captured["weight"]


def test_linear_probe_is_deterministic_for_a_seed() -> None:
    features = train_test_clusters(noise=0.9, dim=16)
    torch.manual_seed(11)  # the global RNG must not matter
    first_result, first_weight = final_weights(seed=5, features=features)
    torch.manual_seed(99)
    second_result, second_weight = final_weights(seed=5, features=features)
    _, other_weight = final_weights(seed=6, features=features)
    assert first_result == second_result
    assert torch.equal(first_weight, second_weight)
    assert not torch.equal(first_weight, other_weight)


@pytest.mark.parametrize("options", [{"epochs": 0}, {"batch_size": 0}, {"lr": -1.0}, {"weight_decay": -0.1}])
def test_linear_probe_rejects_bad_options(options: dict) -> None:
    train, train_labels, test, test_labels = train_test_clusters(noise=0.1)
    with pytest.raises(UserError):
        linear_probe(train, train_labels, test, test_labels, num_classes=5, **options)


def test_linear_probe_rejects_labels_beyond_num_classes() -> None:
    train, train_labels, test, test_labels = train_test_clusters(noise=0.1)
    with pytest.raises(UserError, match="num_classes"):
        linear_probe(train, train_labels, test, test_labels, num_classes=4, epochs=1)


# ---------------------------------------------------------------- label subsets


def test_label_subset_fraction_and_balance() -> None:
    labels = np.repeat(np.arange(10), 100)
    np.random.default_rng(0).shuffle(labels)
    subset = label_subset(labels, 0.1, seed=0)
    assert subset.dtype == np.int64
    assert len(np.unique(subset)) == len(subset) == 100
    assert subset.min() >= 0 and subset.max() < len(labels)
    assert np.array_equal(np.bincount(labels[subset], minlength=10), np.full(10, 10))


def test_label_subset_keeps_at_least_one_per_class() -> None:
    labels = np.concatenate([np.zeros(1000, dtype=np.int64), np.ones(50, dtype=np.int64), np.full(3, 2)])
    counts = np.bincount(labels[label_subset(labels, 0.01, seed=3)], minlength=3)
    assert counts.tolist() == [10, 1, 1]


def test_label_subset_is_deterministic_and_accepts_tensors() -> None:
    labels = torch.arange(5).repeat(200)
    first = label_subset(labels, 0.05, seed=7)
    assert np.array_equal(first, label_subset(labels.numpy(), 0.05, seed=7))
    assert not np.array_equal(first, label_subset(labels, 0.05, seed=8))
    assert np.array_equal(label_subset(labels, 1.0, seed=7), np.arange(1000))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_subset_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(UserError):
        label_subset(np.arange(10) % 2, fraction, seed=0)


# ---------------------------------------------------------------- semi-supervised probes


def test_semi_supervised_probes_keys_ranges_and_more_labels_help() -> None:
    train, train_labels, test, test_labels = train_test_clusters(noise=0.35, dim=48, train_per_class=400)
    results = semi_supervised_probes(train, train_labels, test, test_labels, num_classes=5, epochs=30)
    assert set(results) == {"semi_1pct", "semi_10pct"}
    assert all(0.0 <= accuracy <= 100.0 for accuracy in results.values())
    assert results["semi_10pct"] >= results["semi_1pct"]
    assert results["semi_10pct"] > 60.0


def test_semi_supervised_probe_trains_on_the_labelled_subset_only() -> None:
    train, train_labels, test, test_labels = train_test_clusters(noise=0.5, dim=16)
    kept = torch.from_numpy(label_subset(train_labels, 0.05, seed=4))
    # Features outside the subset are replaced by large noise: a probe that looked at them would change.
    scrambled = 10.0 * torch.randn(train.shape, generator=torch.Generator().manual_seed(0))
    scrambled[kept] = train[kept]
    clean = semi_supervised_probes(train, train_labels, test, test_labels, 5, fractions=(0.05,), epochs=5, seed=4)
    noisy = semi_supervised_probes(scrambled, train_labels, test, test_labels, 5, fractions=(0.05,), epochs=5, seed=4)
    assert set(clean) == {"semi_5pct"}
    assert clean == noisy
    direct = linear_probe(train[kept], train_labels[kept], test, test_labels, 5, epochs=5, seed=4)
    assert clean["semi_5pct"] == direct["test_acc"]


# ---------------------------------------------------------------- real images


def read_cifar_file(path: Path, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` images of one CIFAR-10 python batch file, standardised per channel."""
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="latin1")
    images = torch.from_numpy(np.asarray(batch["data"][:limit], dtype=np.float32) / 255.0).view(-1, 3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    return (images - mean) / std, torch.tensor(batch["labels"][:limit], dtype=torch.int64)


def test_monitors_on_real_cifar_pixels_beat_chance(cifar10_mini_dir: Path) -> None:
    folder = cifar10_mini_dir / "cifar-10-batches-py"
    train_images, train_labels = read_cifar_file(folder / "data_batch_1", limit=1000)
    test_images, test_labels = read_cifar_file(folder / "test_batch", limit=500)

    def batches(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(images[i : i + 128], labels[i : i + 128]) for i in range(0, len(labels), 128)]

    # A fixed 4x4 average pool of the pixels: a weak but honest "encoder".
    def encode(images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, 4).flatten(1)

    train_features, seen_train_labels = extract_features(encode, batches(train_images, train_labels), torch.device("cpu"))
    test_features, _ = extract_features(encode, batches(test_images, test_labels), torch.device("cpu"))
    assert torch.equal(seen_train_labels, train_labels)
    assert knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes=10) > 22.0
    probe = linear_probe(train_features, train_labels, test_features, test_labels, num_classes=10, epochs=10)
    assert probe["test_acc"] > 25.0
