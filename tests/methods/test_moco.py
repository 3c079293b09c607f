"""SFL-MoCo training loop: equivalence with centralised MoCo, gradient routing, FedAvg, resume, outputs."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from moco_reference import reference_info_nce
from sfl_helpers import TINY_MOCO, moco_trainer
from torch import nn

import run_sflmoco
from configs import parse_args
from functions.core.checkpoint import CHECKPOINT_NAME, load_checkpoint
from functions.core.errors import UserError
from functions.data.layout import StepLayout
from functions.losses.moco import info_nce_loss, symmetric_info_nce_loss
from functions.methods.base import StepContext
from functions.methods.moco import MocoServer


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


@pytest.mark.partition_plot
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


# Two clients sharing 64 synthetic images, 16 rows each a step: short epochs (these tests count epochs).
SHORT_EPOCHS = ("--num_client", "2", "--data_proportion", "0.125", "--batch_size", "16")


def test_the_best_knn_epoch_is_kept_in_checkpoint_best(tmp_path, monkeypatch):
    # The kNN monitor is replaced by a fixed sequence: epoch 2 is the best, epoch 3 worse (not saved over it).
    from functions.train import trainer as simulator

    scores = iter([10.0, 30.0, 50.0, 40.0])  # before training, then epochs 1-3
    monkeypatch.setattr(simulator, "knn_evaluation", lambda context: {"knn_acc": next(scores)})
    trainer = moco_trainer(tmp_path, *SHORT_EPOCHS, "--num_epoch", "3", "--eval_freq", "1")
    trainer.train()
    best, last = load_checkpoint(tmp_path / "checkpoint_best.pt"), load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert best["epoch"] == 2 and last["epoch"] == 3
    assert best["global_step"] == 2 * trainer.steps_per_epoch
    assert [accuracy for _, accuracy in best["metrics"]["knn_acc"]] == [10.0, 30.0, 50.0]


def test_no_best_checkpoint_without_the_knn_monitor(tmp_path):
    trainer = moco_trainer(tmp_path, *SHORT_EPOCHS, "--num_epoch", "1", "--eval_freq", "0")
    trainer.train()
    assert (tmp_path / "checkpoint_last.pt").is_file() and not (tmp_path / "checkpoint_best.pt").exists()


def _tiny_moco(*options: str) -> MocoServer:
    """A MoCo server whose network is one 3x3 linear map with known weights (the momentum copy starts equal)."""
    args = parse_args("moco", ["--K", "4", "--K_dim", "3", "--num_client", "2", *options])
    server = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        server.weight.copy_(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.3, 0.0, 1.0]]))
    return MocoServer(args, server, torch.device("cpu"))


def _apply(weight: torch.Tensor, rows: list[list[float]]) -> list[list[float]]:
    return (torch.tensor(rows) @ weight.T).tolist()


ONLINE = [[2.0, 0.0, 1.0], [0.0, 3.0, 0.5]]   # the clients' smashed data of view 1


TARGET = [[1.5, 0.2, 0.9], [1.0, -1.0, 0.0]]  # the clients' momentum copies' smashed data of view 2


TWO_CLIENTS = StepContext(0, StepLayout.of([0, 1], [1, 1]))  # row 0 from client 0, row 1 from client 1
NEGATIVES = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]]


def test_symmetric_loss_is_mocosfls_two_terms_with_the_momentum_smashed_data_as_second_query():
    # MocoSFL (functions/methods/moco.py): loss12 = InfoNCE(server(query), t_server(pkey)) and
    # loss21 = InfoNCE(server(pkey), t_server(query)), summed; query: the client's smashed data, pkey: its
    # momentum copy's. Written out here by hand with the server's weights.
    method = _tiny_moco("--symmetric")
    method.queues.shared.negatives.copy_(torch.tensor(NEGATIVES))
    weight = method.server.weight.detach()
    online = torch.tensor(ONLINE, requires_grad=True)
    loss, _ = method.compute_loss([online], [torch.tensor(TARGET)], TWO_CLIENTS)
    term_12, _ = reference_info_nce(_apply(weight, ONLINE), _apply(weight, TARGET), NEGATIVES, 0.1)
    term_21, _ = reference_info_nce(_apply(weight, TARGET), _apply(weight, ONLINE), NEGATIVES, 0.1)
    assert loss.item() == pytest.approx(term_12 + term_21, rel=1e-5)
    assert abs(term_21) > 1e-3  # the second term is really there

    # Only the first term sends gradients to the clients: the second uses their smashed data as a key only.
    loss.backward()
    first_only = torch.tensor(ONLINE, requires_grad=True)
    plain = _tiny_moco("--no-symmetric")
    plain.queues.shared.negatives.copy_(torch.tensor(NEGATIVES))
    plain_loss, _ = plain.compute_loss([first_only], [torch.tensor(TARGET)], TWO_CLIENTS)
    assert plain_loss.item() == pytest.approx(term_12, rel=1e-5)
    plain_loss.backward()
    assert torch.allclose(online.grad, first_only.grad, atol=1e-6)


def test_symmetric_loss_enqueues_both_keys_in_a_shared_queue_but_only_the_online_keys_in_client_queues():
    # MocoSFL's _dequeue_and_enqueue gets [keys of the online rows, keys of the momentum rows]: the shared queue
    # takes all of them in that order, a client queue takes its rows of the first block only.
    weight = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.3, 0.0, 1.0]])
    unit = torch.nn.functional.normalize
    shared = _tiny_moco("--symmetric")
    shared.start_server_step()
    shared.compute_loss([torch.tensor(ONLINE)], [torch.tensor(TARGET)], TWO_CLIENTS)
    shared.after_server_step()
    expected = unit(torch.tensor(_apply(weight, ONLINE) + _apply(weight, TARGET)), dim=1)
    assert torch.allclose(shared.queues.shared.negatives, expected, atol=1e-6)
    assert shared.queues.shared.pointer == 0  # 4 keys in a queue of 4

    per_client = _tiny_moco("--symmetric", "--disable_feature_sharing")
    per_client.start_server_step()
    per_client.compute_loss([torch.tensor(ONLINE)], [torch.tensor(TARGET)], TWO_CLIENTS)
    per_client.after_server_step()
    online_keys = unit(torch.tensor(_apply(weight, ONLINE)), dim=1)
    for client in (0, 1):
        queue = per_client.queues.of(client)
        assert queue.pointer == 1
        assert torch.allclose(queue.negatives[0], online_keys[client], atol=1e-6)


def test_per_client_queues_give_each_client_its_own_negatives_and_keys():
    method = _tiny_moco("--no-symmetric", "--disable_feature_sharing")
    queue_0, queue_1 = NEGATIVES[:2], NEGATIVES[2:]
    method.queues.of(0).negatives.copy_(torch.tensor(queue_0))
    method.queues.of(1).negatives.copy_(torch.tensor(queue_1))
    method.start_server_step()
    loss, _ = method.compute_loss([torch.tensor(ONLINE)], [torch.tensor(TARGET)], TWO_CLIENTS)
    weight = method.server.weight.detach()
    queries, keys = _apply(weight, ONLINE), _apply(weight, TARGET)
    loss_0, _ = reference_info_nce(queries[:1], keys[:1], queue_0, 0.1)
    loss_1, _ = reference_info_nce(queries[1:], keys[1:], queue_1, 0.1)
    assert loss.item() == pytest.approx((loss_0 + loss_1) / 2, rel=1e-5)
    shared, _ = reference_info_nce(queries, keys, NEGATIVES, 0.1)
    assert abs(loss.item() - shared) > 1e-3  # one shared queue would give another loss

    method.after_server_step()  # each client's key joins its own queue only
    unit_keys = torch.nn.functional.normalize(torch.tensor(keys), dim=1)
    assert torch.allclose(method.queues.of(0).negatives[0], unit_keys[0], atol=1e-6)
    assert torch.allclose(method.queues.of(1).negatives[0], unit_keys[1], atol=1e-6)
    assert torch.equal(method.queues.of(0).negatives[1], torch.tensor(queue_0[1]))


def test_client_queues_start_with_unit_keys_unless_compat_mocosfl_asks_for_its_raw_gaussian_rows():
    # MocoSFL: torch.randn(K_dim, K // num_client) per client, never normalised (its shared queue is).
    fixed = _tiny_moco("--disable_feature_sharing")
    raw = _tiny_moco("--disable_feature_sharing", "--compat", "mocosfl")
    for client in (0, 1):
        fixed_rows, raw_rows = fixed.queues.of(client).negatives, raw.queues.of(client).negatives
        assert torch.allclose(fixed_rows.norm(dim=1), torch.ones(2), atol=1e-6)
        assert torch.allclose(fixed_rows, torch.nn.functional.normalize(raw_rows, dim=1), atol=1e-6)  # same draws
        assert not torch.allclose(raw_rows.norm(dim=1), torch.ones(2), atol=1e-2)
    shared = _tiny_moco("--compat", "mocosfl").queues.shared.negatives
    assert torch.allclose(shared.norm(dim=1), torch.ones(4), atol=1e-6)
