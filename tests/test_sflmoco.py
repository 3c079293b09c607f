"""SFL-MoCo training loop: equivalence with centralised MoCo, gradient routing, FedAvg, resume, outputs."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from sfl_helpers import TINY_MOCO, moco_trainer
from torch import nn

import run_sflmoco
from functions.core.checkpoint import CHECKPOINT_NAME, load_checkpoint
from functions.core.distributed import Runtime
from functions.core.errors import UserError
from functions.losses.moco import info_nce_loss, symmetric_info_nce_loss
from functions.sfl.clients.loop import ClientSide, query_index
from functions.sfl.fedavg import fedavg


def _parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("variant", ["plain", "symmetric", "symmetric_both_views"])
def test_one_client_step_equals_centralised_moco_step(tmp_path, variant):
    extra = ["--num_client", "1", "--batch_size", "12", "--weight_decay", "0.0005", "--momentum", "0.9"]
    flags = {"plain": ["--no-symmetric"], "symmetric": ["--symmetric"], "symmetric_both_views": ["--symmetric_both_views"]}
    trainer = moco_trainer(tmp_path, *extra, *flags[variant])
    batch = next(trainer.data.loaders.train.epoch(0))
    trainer.set_learning_rates(0, 0)

    # The centralised reference: the unsplit network (client layers then server layers) and its momentum copy.
    client, server = copy.deepcopy(trainer.clients.models[0]), copy.deepcopy(trainer.method.server)
    client_key, server_key = copy.deepcopy(trainer.clients.momentum_models[0]), copy.deepcopy(trainer.method.server_momentum)
    encoder, key_encoder = nn.Sequential(client, server), nn.Sequential(client_key, server_key)
    negatives = trainer.method.queues.shared.negatives.clone()
    optimizer = torch.optim.SGD(encoder.parameters(), lr=trainer.args.lr, momentum=0.9, weight_decay=0.0005)
    view_1, view_2 = batch.crops
    T = trainer.args.T
    if variant == "plain":
        with torch.no_grad():
            key_2 = key_encoder(view_2)
        expected_loss, _ = info_nce_loss(encoder(view_1), key_2, negatives, T)
    elif variant == "symmetric":
        # MocoSFL: the swapped term's query is the client momentum copy's output, its key the online client's output
        # through the momentum server; only the first term reaches the client.
        smashed_1 = client(view_1)
        with torch.no_grad():
            target_2 = client_key(view_2)
            key_2, key_1 = server_key(target_2), server_key(smashed_1)
        expected_loss = (info_nce_loss(server(smashed_1), key_2, negatives, T)[0]
                         + info_nce_loss(server(target_2), key_1, negatives, T)[0])
    else:
        with torch.no_grad():
            key_1, key_2 = key_encoder(view_1), key_encoder(view_2)
        expected_loss, _ = symmetric_info_nce_loss(encoder(view_1), key_1, encoder(view_2), key_2, negatives, T)
    optimizer.zero_grad()
    expected_loss.backward()
    optimizer.step()

    loss, _ = trainer.train_step(batch)

    assert torch.allclose(loss, expected_loss.detach(), atol=1e-6)
    for (name, expected), (_, actual) in zip(_parameters(encoder[0]).items(), _parameters(trainer.clients.models[0]).items()):
        assert torch.allclose(actual, expected, atol=1e-6), name
    for (name, expected), (_, actual) in zip(_parameters(encoder[1]).items(), _parameters(trainer.method.server).items()):
        assert torch.allclose(actual, expected, atol=1e-6), name


def _three_different_clients() -> ClientSide:
    torch.manual_seed(0)
    clients = ClientSide(nn.Linear(4, 3), 3, lr=0.1, momentum=0.0, weight_decay=0.0, keep_momentum_copies=False,
                         device=torch.device("cpu"))
    for model in clients.models:  # each client its own weights, so a misrouted row changes the gradients
        nn.init.normal_(model.weight)
    return clients


def test_gradient_rows_return_to_the_clients_that_sent_them():
    clients = _three_different_clients()
    rows = [1, 3, 2]
    data = [torch.randn(6, 4), torch.randn(6, 4)]  # two crops, rows grouped by client
    smashed = clients.forward(data, [0, 1, 2], rows)
    server_inputs = [s.detach().requires_grad_(True) for s in smashed]
    server_weights = [torch.randn(6, 3), torch.randn(6, 3)]
    sum((x * w).sum() ** 2 for x, w in zip(server_inputs, server_weights)).backward()
    clients.backward([x.grad for x in server_inputs])

    offsets = query_index(rows)
    assert offsets == [0, 1, 4, 6]
    for client in range(3):
        model = copy.deepcopy(clients.models[client])
        model.zero_grad()
        begin, end = offsets[client], offsets[client + 1]
        # The row gradients the server computed for this client's rows, pushed through this client alone.
        for crop, x, in zip(data, server_inputs):
            model(crop[begin:end]).backward(x.grad[begin:end])
        assert torch.allclose(clients.models[client].weight.grad, model.weight.grad, atol=1e-6)


def test_fedavg_is_weighted_by_data_size_and_loaded_into_every_client():
    clients = _three_different_clients()
    weights = [clients.models[c].weight.detach().clone() for c in range(3)]
    fedavg(clients, [0, 2], {0: 30, 2: 10}, Runtime(device=torch.device("cpu")))
    expected = 0.75 * weights[0] + 0.25 * weights[2]
    for model in clients.models:
        assert torch.allclose(model.weight, expected, atol=1e-6)


def test_fedavg_of_identical_clients_is_the_identity():
    clients = ClientSide(nn.Linear(4, 3), 4, lr=0.1, momentum=0.0, weight_decay=0.0, keep_momentum_copies=True,
                         device=torch.device("cpu"))
    before = clients.models[0].weight.detach().clone()
    fedavg(clients, [0, 1, 2, 3], [5, 1, 7, 3], Runtime(device=torch.device("cpu")), include_momentum_copies=True)
    for model in clients.models + clients.momentum_models:
        assert torch.equal(model.weight, before)


def _run(tmp_path, name, *extra):
    output_dir = tmp_path / name
    argv = [*TINY_MOCO, "--num_client", "3", "--batch_size", "8", "--output_dir", str(output_dir), *extra]
    return run_sflmoco.main(argv), output_dir


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
    _, straight = _run(tmp_path, "straight", "--max_steps", "6", "--partition", "dirichlet")
    _, split = _run(tmp_path, "split", "--max_steps", "3", "--partition", "dirichlet")
    halfway = load_checkpoint(split / CHECKPOINT_NAME)
    assert halfway["global_step"] == 3
    _run(tmp_path, "split", "--max_steps", "6", "--partition", "dirichlet", "--resume")
    expected, actual = load_checkpoint(straight / CHECKPOINT_NAME), load_checkpoint(split / CHECKPOINT_NAME)
    assert actual["global_step"] == expected["global_step"] == 6
    for key, value in expected["method"].items():
        assert torch.equal(actual["method"][key], value), key
    for expected_client, actual_client in zip(expected["clients"]["models"], actual["clients"]["models"]):
        for key, value in expected_client.items():
            assert torch.equal(actual_client[key], value), key
    assert torch.equal(actual["parts"]["method_extra"]["queue"]["negatives"],
                       expected["parts"]["method_extra"]["queue"]["negatives"])
    expected_losses = json.loads((straight / "metrics.json").read_text())["train_loss"]
    actual_losses = json.loads((split / "metrics.json").read_text())["train_loss"]
    assert actual_losses == expected_losses


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    _run(tmp_path, "run", "--max_steps", "1")
    with pytest.raises(UserError, match="--lr"):
        _run(tmp_path, "run", "--max_steps", "2", "--resume", "--lr", "0.5")


def test_a_second_run_into_the_same_folder_needs_resume(tmp_path):
    _run(tmp_path, "run", "--max_steps", "1")
    with pytest.raises(UserError, match="--resume"):
        _run(tmp_path, "run", "--max_steps", "1")


def test_a_run_writes_every_output(tmp_path):
    results, output_dir = _run(tmp_path, "run", "--max_steps", "3", "--eval_freq", "1")
    for name in ("config.yaml", "partition.json", "partition.png", "output.log", "metrics.json", CHECKPOINT_NAME):
        assert (output_dir / name).is_file(), name
    assert list((output_dir / "tensorboard").iterdir())
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert [step for step, _ in metrics["train_loss"]] == [1, 2, 3]
    assert metrics["knn_acc"][0][0] == 0 and 0 <= metrics["knn_acc"][0][1] <= 100
    assert metrics["final"]["step"] == 3 and metrics["final"]["knn_acc"] == results["knn_acc"]
    assert metrics["data_backend"] == "torch" and metrics["world_size"] == 1
    assert "contrastive_acc" in metrics


def test_redirected_output_gets_plain_progress_lines_not_a_bar(tmp_path, capsys):
    # Under pytest stdout is not a terminal, as in a Slurm log: one line per log point, no carriage returns.
    _run(tmp_path, "run", "--max_steps", "4", "--log_freq", "2")
    printed = capsys.readouterr().out
    assert "\r" not in printed
    progress = [line for line in printed.splitlines() if line.startswith("epoch 1/2 step ")]
    assert [line.split(":")[0].split(" step ")[1].split("/")[0] for line in progress] == ["2", "4"]
    assert all(" img/s" in line and "loss " in line for line in progress)


def test_cudnn_benchmark_is_on_only_when_asked(tmp_path):
    try:
        _run(tmp_path, "fast", "--max_steps", "1", "--cudnn_benchmark")
        assert torch.backends.cudnn.benchmark is True
        _run(tmp_path, "reproducible", "--max_steps", "1")
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = False


def test_the_best_knn_epoch_is_kept_in_checkpoint_best(tmp_path, monkeypatch):
    # The kNN monitor is replaced by a fixed sequence: epoch 2 is the best, epoch 3 worse (not saved over it).
    from functions.train import trainer as simulator

    scores = iter([10.0, 30.0, 50.0, 40.0])  # before training, then epochs 1-3
    monkeypatch.setattr(simulator, "knn_evaluation", lambda context: {"knn_acc": next(scores)})
    trainer = moco_trainer(tmp_path, "--num_epoch", "3", "--eval_freq", "1")
    trainer.train()
    best, last = load_checkpoint(tmp_path / "checkpoint_best.pt"), load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert best["epoch"] == 2 and last["epoch"] == 3
    assert best["global_step"] == 2 * trainer.steps_per_epoch
    assert [accuracy for _, accuracy in best["metrics"]["knn_acc"]] == [10.0, 30.0, 50.0]


def test_no_best_checkpoint_without_the_knn_monitor(tmp_path):
    trainer = moco_trainer(tmp_path, "--num_epoch", "1", "--eval_freq", "0")
    trainer.train()
    assert (tmp_path / "checkpoint_last.pt").is_file() and not (tmp_path / "checkpoint_best.pt").exists()
