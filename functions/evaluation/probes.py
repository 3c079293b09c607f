"""Evaluation of a frozen encoder: kNN monitor, linear probe and semi-supervised linear probes.

The encoder is seen as one function ``encode(images) -> (B, D) features``; the caller composes the
client and server parts and chooses train/eval mode. Everything after feature extraction works on
precomputed feature tensors, so the probes are cheap even on a CPU.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from functions.core.errors import UserError

# Called after every linear-probe epoch with (epoch index from 0, classifier); e.g. for logging.
EpochCallback = Callable[[int, nn.Module], None]


def _check_features(features: Tensor, labels: Tensor | None, name: str) -> None:
    """Raise ValueError unless features are (N, D) and labels (if given) are a matching (N,) vector."""
    if features.dim() != 2:
        raise ValueError(f"{name} features must be a 2-D (N, D) tensor, got shape {tuple(features.shape)}")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != features.shape[0]):
        raise ValueError(
            f"{name} labels must be a 1-D tensor of length {features.shape[0]}, got shape {tuple(labels.shape)}"
        )


def _check_feature_sets(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                        test_labels: Tensor | None) -> None:
    """Both sets well formed and of the same feature dimension."""
    _check_features(train_features, train_labels, "train")
    _check_features(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have {train_features.shape[1]} dims, test features {test_features.shape[1]}")

def _check_label_range(labels: Tensor, num_classes: int, name: str) -> None:
    """Raise UserError if a label falls outside [0, num_classes)."""
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(
            f"{name} labels span [{int(labels.min())}, {int(labels.max())}] but num_classes is {num_classes}; "
            "pass the dataset's number of classes"
        )


@torch.no_grad()
def extract_features(
    encode: Callable[[Tensor], Tensor],
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    normalize: bool = True,
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Encode every batch of a loader in order; return CPU float32 features (L2-normalised if asked) and int64 labels."""
    device = torch.device(device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    )
    feature_blocks: list[Tensor] = []
    label_blocks: list[Tensor] = []
    for images, labels in tqdm(loader, desc="features", disable=not progress, leave=False):
        labels = torch.as_tensor(labels).reshape(-1).to("cpu", torch.int64)
        with autocast:
            features = encode(images.to(device, non_blocking=True))
        # A pooled map of shape (B, D, 1, 1) is still one D-vector per image.
        features = features.flatten(start_dim=1).float()
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"encode returned {features.shape[0]} rows for a batch of {labels.shape[0]} labels")
        if normalize:
            features = F.normalize(features, dim=1)
        feature_blocks.append(features.cpu())
        label_blocks.append(labels)
    if not feature_blocks:
        raise UserError("the evaluation loader yielded no batches; check the dataset folder and split")
    return torch.cat(feature_blocks), torch.cat(label_blocks)


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> Tensor:
    """Weighted kNN class scores (InstDisc/MoCo monitor): top-k cosine neighbours vote with exp(sim/T).

    Returns (M, num_classes) float64 scores on ``device`` (default: where the train features are).
    """
    _check_feature_sets(train_features, train_labels, test_features, None)
    if train_features.shape[0] == 0:
        raise UserError("the kNN monitor needs at least one training feature; the memory set is empty")
    if k < 1:
        raise UserError(f"kNN k must be at least 1, got {k}")
    if not temperature > 0:
        raise UserError(f"kNN temperature must be positive, got {temperature}")
    if chunk_size < 1:
        raise UserError(f"kNN chunk_size must be at least 1, got {chunk_size}")
    _check_label_range(train_labels, num_classes, "train")

    k = min(k, train_features.shape[0])
    device = torch.device(device) if device is not None else train_features.device
    bank = F.normalize(train_features.to(device, torch.float32), dim=1)
    bank_labels = train_labels.to(bank.device, torch.int64)
    queries = F.normalize(test_features.float().to(bank.device), dim=1)
    score_blocks: list[Tensor] = []
    for start in range(0, queries.shape[0], chunk_size):
        similarity = queries[start : start + chunk_size] @ bank.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        # float64 keeps exp(1/T) finite for temperatures down to about 1/700.
        weights = (top_similarity.double() / temperature).exp()
        scores = torch.zeros(weights.shape[0], num_classes, dtype=torch.float64, device=bank.device)
        scores.scatter_add_(1, bank_labels[top_index], weights)
        score_blocks.append(scores)
    if not score_blocks:
        return torch.zeros(0, num_classes, dtype=torch.float64, device=bank.device)
    return torch.cat(score_blocks)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy in percent of the weighted kNN classifier (k clipped to the number of train features)."""
    _check_features(test_features, test_labels, "test")
    if test_features.shape[0] == 0:
        raise UserError("the kNN monitor needs at least one test feature; the test set is empty")
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k=k, temperature=temperature,
                         device=device)
    predictions = scores.argmax(dim=1).cpu()
    return 100.0 * (predictions == test_labels.cpu().long()).double().mean().item()


def _standardize(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Centre and scale both sets per dimension with the train set's mean and standard deviation."""
    mean = train.mean(dim=0, keepdim=True)
    # Constant dimensions (dead units) would otherwise divide by zero.
    std = train.std(dim=0, keepdim=True, unbiased=False).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


@torch.no_grad()
def _accuracy(classifier: nn.Module, features: Tensor, labels: Tensor, batch_size: int = 8192) -> float:
    """Top-1 accuracy in percent of a classifier on features, in batches."""
    if features.shape[0] == 0:
        return float("nan")
    correct = 0
    for start in range(0, features.shape[0], batch_size):
        logits = classifier(features[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    return 100.0 * correct / features.shape[0]


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    on_epoch_end: EpochCallback | None = None,
) -> dict:
    """Train a linear classifier on frozen, standardised features; return final-epoch train/test accuracy in percent.

    SGD with momentum 0.9 and a per-step cosine learning rate; the weights start at zero and the
    batch order comes from ``seed``, so a run is reproducible without touching the global RNG.
    ``test_acc`` is measured once, after the last epoch (never the best over epochs).
    """
    _check_feature_sets(train_features, train_labels, test_features, test_labels)
    if train_features.shape[0] == 0:
        raise UserError("the linear probe needs at least one labelled training feature")
    if epochs < 1:
        raise UserError(f"linear probe epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise UserError(f"linear probe batch_size must be at least 1, got {batch_size}")
    if not lr > 0:
        raise UserError(f"linear probe lr must be positive, got {lr}")
    if weight_decay < 0:
        raise UserError(f"linear probe weight_decay must be non-negative, got {weight_decay}")
    _check_label_range(train_labels, num_classes, "train")
    _check_label_range(test_labels, num_classes, "test")

    device = torch.device(device) if device is not None else train_features.device
    train_x, test_x = _standardize(train_features.to(device, torch.float32), test_features.to(device, torch.float32))
    train_y = train_labels.to(device, torch.int64)
    test_y = test_labels.to(device, torch.int64)

    classifier = nn.Linear(train_x.shape[1], num_classes).to(device)
    # Softmax regression is convex: a zero start loses nothing and needs no random init.
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    num_train = train_x.shape[0]
    steps_per_epoch = math.ceil(num_train / batch_size)
    total_steps = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)

    step = 0
    for epoch in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False):
        order = torch.randperm(num_train, generator=generator).to(device)
        for start in range(0, num_train, batch_size):
            batch = order[start : start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            loss = F.cross_entropy(classifier(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if on_epoch_end is not None:
            on_epoch_end(epoch, classifier)

    return {
        "test_acc": _accuracy(classifier, test_x, test_y),
        "train_acc": _accuracy(classifier, train_x, train_y),
        "epochs": epochs,
    }


def label_subset(labels: np.ndarray | Tensor, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced random subset holding `fraction` of each class (at least one per class)."""
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels).reshape(-1)
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"label fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        # Round half up so e.g. 1% of 50 is 1 (not 0), then keep one example of every class.
        count = max(1, min(len(members), math.floor(fraction * len(members) + 0.5)))
        chosen.append(rng.choice(members, size=count, replace=False))
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def semi_supervised_probes(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    fractions: Sequence[float] = (0.01, 0.1),
    epochs: int = 100,
    seed: int = 0,
    device: torch.device | str | None = None,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
) -> dict[str, float]:
    """Final test accuracy (percent) of linear probes trained on class-balanced label fractions, keyed "semi_<pct>pct"."""
    results: dict[str, float] = {}
    for fraction in fractions:
        subset = torch.from_numpy(label_subset(train_labels, fraction, seed))
        probe = linear_probe(
            train_features[subset.to(train_features.device)],
            train_labels[subset.to(train_labels.device)],
            test_features,
            test_labels,
            num_classes,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            seed=seed,
            device=device,
        )
        results[f"semi_{fraction * 100:g}pct"] = probe["test_acc"]
    return results


# --------------------------------------------------------------------------------------- the run's evaluations


# An evaluation of the final model: its figures by name (None for one it skipped), e.g. {"linear_acc": 61.2}.


# What a finished run reports, in order; a new evaluation (a probe, an attack) is one function added here.
