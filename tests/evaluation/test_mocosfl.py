"""--eval_protocol: the honest probes never select on the test set; MocoSFL's select their best test epoch, on the
checkpoint with the best kNN accuracy, and are labelled so."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from configs import parse_args
from functions.core.checkpoint import load_checkpoint
from functions.core.errors import UserError
from functions.evaluation.mocosfl import mocosfl_head, mocosfl_probe, mocosfl_probes, mocosfl_subset
from functions.evaluation.probes import linear_probe
from functions.train.runner import run


def clusters(seed: int = 7, per_class: int = 500, classes: int = 4, dim: int = 16, noise: float = 0.3):
    """Train features in random order and class-major test features, around the same class centres."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=generator), dim=1) * 3
    labels = torch.arange(classes).repeat_interleave(per_class)
    train = centres[labels] + noise * torch.randn(labels.numel(), dim, generator=generator)
    test = centres[labels] + noise * torch.randn(labels.numel(), dim, generator=generator)
    order = torch.randperm(labels.numel(), generator=generator)
    return train[order], labels[order], test, labels.clone()


def class_zero_everywhere(last_epoch: int):
    """An epoch callback that, after the last epoch's training, makes the head answer class 0 for every image."""
    def callback(epoch: int, head: nn.Module) -> None:
        if epoch == last_epoch:
            with torch.no_grad():
                final = head[-1]
                final.weight.zero_()
                final.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    return callback


@pytest.mark.parametrize("head, epochs", [("linear", 30), ("mlp", 5)])  # Adam at 1e-3 moves a linear head slowly
def test_mocosfl_probe_reports_its_best_test_epoch(head: str, epochs: int) -> None:
    train, train_labels, test, test_labels = clusters()
    result = mocosfl_probe(train, train_labels, test, test_labels, 4, head=head, epochs=epochs,
                           on_epoch_end=class_zero_everywhere(epochs - 1))
    chance_of_class_zero = 100.0 * (test_labels == 0).float().mean().item()
    assert result["final_test_acc"] == pytest.approx(chance_of_class_zero)
    assert len(result["test_acc_per_epoch"]) == epochs
    # Selected on the test set: the best of the scored epochs, not the last.
    assert result["best_test_acc"] == max(result["test_acc_per_epoch"]) > 90.0
    assert result["best_epoch"] == result["test_acc_per_epoch"].index(result["best_test_acc"]) + 1 < epochs


def test_the_honest_probe_reports_its_last_epoch_whatever_came_before() -> None:
    train, train_labels, test, test_labels = clusters()
    epochs = 5

    def class_zero_at_the_end(epoch: int, classifier: nn.Module) -> None:
        if epoch == epochs - 1:
            with torch.no_grad():
                classifier.weight.zero_()
                classifier.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))

    honest = linear_probe(train, train_labels, test, test_labels, 4, epochs=epochs, on_epoch_end=class_zero_at_the_end)
    assert honest["test_acc"] == pytest.approx(100.0 * (test_labels == 0).float().mean().item())


def test_mocosfl_heads_optimiser_and_schedules_are_mocosfls() -> None:
    linear, mlp = mocosfl_head("linear", 512, 10), mocosfl_head("mlp", 512, 10)
    assert [type(layer) for layer in mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert mlp[0].out_features == 512 and linear[0].in_features == 512
    assert torch.count_nonzero(linear[0].bias) == 0 and torch.count_nonzero(mlp[3].bias) == 0
    bound = (6.0 / (512 + 10)) ** 0.5  # Xavier-uniform
    assert linear[0].weight.abs().max() <= bound and linear[0].weight.abs().max() > 0.9 * bound
    # The schedules advance per batch: 300 images = 3 batches of 128 per epoch, so with 8 epochs the MLP's
    # milestones (epochs 4 and 6 by count) fall inside the second epoch.
    seen: list[float] = []
    train, labels = torch.randn(300, 8), torch.randint(0, 4, (300,))

    def learning_rates(epoch: int, head: nn.Module) -> None:
        seen.append(round(optimizers[-1].param_groups[0]["lr"], 12))

    optimizers: list[torch.optim.Optimizer] = []
    original = torch.optim.Adam

    class RecordedAdam(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    torch.optim.Adam = RecordedAdam
    try:
        mocosfl_probe(train, labels, train[:10], labels[:10], 4, head="mlp", epochs=8, on_epoch_end=learning_rates)
    finally:
        torch.optim.Adam = original
    assert optimizers[0].defaults["lr"] == 1e-3
    assert seen[0] == 1e-3 and seen[1] == pytest.approx(1e-5) and seen[-1] == pytest.approx(1e-5)


def test_mocosfl_subset_is_a_prefix_of_one_random_permutation() -> None:
    subset = mocosfl_subset(1000, 0.01, seed=4)
    assert subset.shape == (10,)
    assert torch.equal(subset, mocosfl_subset(1000, 1.0, seed=4)[:10])
    assert not torch.equal(mocosfl_subset(1000, 1.0, seed=4), torch.arange(1000))
    with pytest.raises(UserError, match="is none"):
        mocosfl_subset(50, 0.01, seed=0)


def test_mocosfl_probes_name_every_figure_test_selected() -> None:
    train, train_labels, test, test_labels = clusters()
    results = mocosfl_probes(train, train_labels, test, test_labels, 4, epochs=30, seed=0)
    assert set(results) == {"linear_acc_test_selected", "linear_acc_best_epoch", "semi_10pct_test_selected",
                            "semi_10pct_best_epoch", "semi_1pct_test_selected", "semi_1pct_best_epoch"}
    assert results["linear_acc_test_selected"] > 90.0


def test_mocosfl_protocol_needs_the_knn_monitor() -> None:
    with pytest.raises(UserError, match="needs the kNN monitor"):
        parse_args("moco", ["--eval_protocol", "mocosfl", "--eval_freq", "0"])


# ------------------------------------------------------------------------------- whole runs on real images
def _mini_run(output_dir: Path, data_dir: Path, protocol: str) -> dict:
    args = parse_args("moco", [
        "--dataset", "cifar10", "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--arch", "ResNet18",
        "--width", "8", "--num_workers", "0", "--K", "64", "--K_dim", "16", "--num_client", "2",
        "--batch_size", "16", "--data_proportion", "0.05", "--num_epoch", "3", "--eval_freq", "1",
        "--linear_epochs", "2", "--seed", "3", "--eval_protocol", protocol])
    return run(args)


def test_both_protocols_on_cifar10_mini(tmp_path, cifar10_mini_dir, monkeypatch) -> None:
    from functions.train import trainer as simulator

    # The kNN monitor during training is replaced by a fixed sequence: epoch 2 is the best, epoch 3 worse.
    scores = {"honest": iter([10.0, 30.0, 50.0, 40.0]), "mocosfl": iter([10.0, 30.0, 50.0, 40.0])}
    protocol = {"name": "honest"}
    monkeypatch.setattr(simulator, "knn_evaluation", lambda context: {"knn_acc": next(scores[protocol["name"]])})

    honest = _mini_run(tmp_path / "honest", cifar10_mini_dir, "honest")
    assert honest["model"] == "checkpoint_last.pt" and honest["epoch"] == 3
    assert {"knn_acc", "linear_acc", "semi_1pct", "semi_10pct"} <= set(honest)
    assert not any(key.endswith("_test_selected") for key in honest)

    protocol["name"] = "mocosfl"
    selected = _mini_run(tmp_path / "mocosfl", cifar10_mini_dir, "mocosfl")
    assert selected["model"] == "checkpoint_best.pt" and selected["epoch"] == 2 and selected["step"] < honest["step"]
    assert {"knn_acc_test_selected", "linear_acc_test_selected", "semi_1pct_test_selected",
            "semi_10pct_test_selected"} <= set(selected)
    assert not {"knn_acc", "linear_acc", "semi_1pct", "semi_10pct"} & set(selected)
    # The evaluation of the best epoch left the run's own state as it was.
    assert load_checkpoint(tmp_path / "mocosfl" / "checkpoint_last.pt")["epoch"] == 3
    # The evaluated model is the best epoch's: the honest kNN of checkpoint_best.pt is the same figure.
    best_only = run(parse_args("moco", ["--eval_only", "--checkpoint", str(tmp_path / "mocosfl" / "checkpoint_best.pt"),
                                        "--skip_linear", "--eval_protocol", "honest",
                                        "--data_dir", str(cifar10_mini_dir)]))
    assert best_only["knn_acc"] == pytest.approx(selected["knn_acc_test_selected"])
    assert best_only["epoch"] == 2
