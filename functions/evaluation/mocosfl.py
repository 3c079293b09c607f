"""MocoSFL's evaluation protocol (``--eval_protocol mocosfl``), as MocoSFL's code runs it after training.

MocoSFL evaluates the checkpoint with the best kNN accuracy, trains a linear head (all labels) and an MLP head
(10 % and 1 % of the labels) on its frozen, unnormalised pooled features, scores the test set after every epoch and
reports the best epoch. Its figures are therefore selected on the test set: they are reported under keys ending in
``_test_selected`` and are not comparable with the default protocol's (functions.evaluation.probes), which never looks at
the test set before its final epoch.

Details kept from MocoSFL's code (functions/sflmoco_functions.py, linear_eval and semisupervise_eval; datasets.py):
batches of 128 in one random order drawn once (its loaders take a random permutation and do not shuffle); Adam at
1e-3; the linear head's cosine schedule of period ``epochs // 4`` and the MLP head's decay at 60 % and 80 % of
``epochs`` both advanced once per batch, not per epoch; Xavier-uniform weights and zero biases; a label subset is the
first ``int(fraction * N)`` images of a random permutation (not class-balanced).
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from functions.core.errors import UserError

__all__ = ["MOCOSFL_BATCH_SIZE", "MOCOSFL_SEMI_FRACTIONS", "mocosfl_head", "mocosfl_probe", "mocosfl_subset",
           "mocosfl_probes"]

MOCOSFL_BATCH_SIZE = 128
MOCOSFL_SEMI_FRACTIONS = (0.1, 0.01)
HeadKind = Literal["linear", "mlp"]
# Called after each epoch's training, before its test score, with (epoch index from 0, head); e.g. for logging.
EpochCallback = Callable[[int, nn.Module], None]


def _xavier(module: nn.Module) -> None:
    """MocoSFL's init_weights: Xavier-uniform weights and zero biases for linear layers."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight, gain=1.0)
        nn.init.zeros_(module.bias)


def mocosfl_head(kind: HeadKind, feature_dim: int, num_classes: int) -> nn.Module:
    """The probe head MocoSFL trains: one linear layer, or linear-BatchNorm-ReLU-linear with 512 hidden units."""
    if kind == "linear":
        head = nn.Sequential(nn.Linear(feature_dim, num_classes))
    elif kind == "mlp":
        head = nn.Sequential(nn.Linear(feature_dim, 512), nn.BatchNorm1d(512), nn.ReLU(True),
                             nn.Linear(512, num_classes))
    else:
        raise ValueError(f"unknown MocoSFL probe head {kind!r}")
    head.apply(_xavier)
    return head


def _schedule(kind: HeadKind, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """MocoSFL's schedules, which its loops step once per batch (so they run far faster than their epoch counts)."""
    if kind == "linear":
        # MocoSFL uses T_max = epochs // 4; at least 1 so that a probe of under four epochs still runs.
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs // 4))
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[int(0.6 * epochs), int(0.8 * epochs)],
                                                gamma=0.1)


@torch.no_grad()
def _test_accuracy(head: nn.Module, features: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent of the head (in eval mode) on the test features, in MocoSFL-sized batches."""
    head.eval()
    correct = 0
    for start in range(0, features.shape[0], MOCOSFL_BATCH_SIZE):
        logits = head(features[start : start + MOCOSFL_BATCH_SIZE])
        correct += int((logits.argmax(dim=1) == labels[start : start + MOCOSFL_BATCH_SIZE]).sum())
    head.train()
    return 100.0 * correct / features.shape[0]


def mocosfl_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    head: HeadKind = "linear",
    epochs: int = 100,
    seed: int = 0,
    device: torch.device | str | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> dict[str, Any]:
    """Train a MocoSFL probe head on features in their given order; return its best test accuracy over epochs.

    Returns ``best_test_acc`` (the figure MocoSFL reports: selected on the test set), ``best_epoch`` (from 1),
    ``final_test_acc`` and ``test_acc_per_epoch``.
    """
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise UserError("the MocoSFL probes need at least one labelled training image and one test image")
    if epochs < 1:
        raise UserError(f"probe epochs must be at least 1, got {epochs}")
    device = torch.device(device) if device is not None else train_features.device
    with torch.random.fork_rng(devices=[]):  # the Xavier draw comes from the seed and leaves the run's RNG alone
        torch.manual_seed(seed)
        probe = mocosfl_head(head, train_features.shape[1], num_classes).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    schedule = _schedule(head, optimizer, epochs)
    train_x, train_y = train_features.to(device, torch.float32), train_labels.to(device, torch.int64)
    test_x, test_y = test_features.to(device, torch.float32), test_labels.to(device, torch.int64)
    per_epoch: list[float] = []
    for epoch in range(epochs):
        probe.train()
        for start in range(0, train_x.shape[0], MOCOSFL_BATCH_SIZE):
            inputs = train_x[start : start + MOCOSFL_BATCH_SIZE]
            if head == "mlp" and inputs.shape[0] == 1:
                continue  # BatchNorm cannot train on one image (MocoSFL's code would stop here)
            loss = nn.functional.cross_entropy(probe(inputs), train_y[start : start + MOCOSFL_BATCH_SIZE])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch, probe)
        per_epoch.append(_test_accuracy(probe, test_x, test_y))
    best_epoch = max(range(epochs), key=lambda index: (per_epoch[index], -index))
    return {"best_test_acc": per_epoch[best_epoch], "best_epoch": best_epoch + 1, "final_test_acc": per_epoch[-1],
            "test_acc_per_epoch": per_epoch}


def mocosfl_subset(num_images: int, fraction: float, seed: int) -> Tensor:
    """Indices of MocoSFL's training subset, in the order its loader reads them: the first int(fraction * N) of a
    random permutation."""
    count = int(num_images * fraction)
    if count < 1:
        raise UserError(f"{fraction:g} of {num_images} training images is none; the MocoSFL probes need a larger "
                        "dataset")
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:count]


def mocosfl_probes(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                   num_classes: int, *, epochs: int, seed: int, device: torch.device | str | None = None
                   ) -> dict[str, Any]:
    """MocoSFL's linear probe (all labels) and semi-supervised MLP probes (10 % and 1 %): best test epoch of each."""
    results: dict[str, Any] = {}
    runs = [("linear_acc", "linear", 1.0), *((f"semi_{fraction * 100:g}pct", "mlp", fraction)
                                            for fraction in MOCOSFL_SEMI_FRACTIONS)]
    for offset, (name, head, fraction) in enumerate(runs):
        order = mocosfl_subset(train_features.shape[0], fraction, seed + offset)
        probe = mocosfl_probe(train_features[order], train_labels[order], test_features, test_labels, num_classes,
                              head=head, epochs=epochs, seed=seed + offset, device=device)
        results[f"{name}_test_selected"] = probe["best_test_acc"]
        results[f"{name}_best_epoch"] = probe["best_epoch"]
    return results
