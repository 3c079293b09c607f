"""SFL-SwAV: equivalence with centralised SwAV, crop-major stacking, queue, frozen prototypes, fp16 codes."""
from __future__ import annotations

import copy

import pytest
import torch
from sfl_helpers import swav_trainer
from torch import nn

import functions.methods.swav as swav
from functions.core.errors import UserError
from functions.data.layout import StepLayout
from functions.methods.base import StepContext

MULTI_CROP = ["--nmb_crops", "2", "2", "--size_crops", "16", "8", "--min_scale_crops", "0.3", "0.1",
              "--max_scale_crops", "1", "0.3", "--crops_for_assign", "0", "1"]


def _centralised_swav_loss(client: nn.Module, server: nn.Module, crops: list[torch.Tensor], method,
                           client_major: bool = False, clients: int = 1) -> torch.Tensor:
    """SwAV on the unsplit network over the given crops; optionally stacks rows client-major (the wrong way)."""
    swav.normalize_prototypes_(server.prototypes)
    groups = swav.resolution_groups(crops)
    if client_major:  # within each resolution group: all crops of client 0, then of client 1, ...
        per_group = [list(g.chunk(len(g) // crops[0].shape[0])) for g in groups]
        groups = [torch.cat([chunk.chunk(clients)[c] for c in range(clients) for chunk in chunks])
                  for chunks in per_group]
    embeddings = server([client(g) for g in groups])
    scores = server.prototypes(embeddings).split(crops[0].shape[0])
    codes = {crop: swav.sinkhorn_knopp(scores[crop].detach(), method.epsilon, method.sinkhorn_iterations)
             for crop in method.crops_for_assign}
    return swav.swapped_prediction_loss(scores, codes, method.temperature)


def test_one_client_step_equals_centralised_swav_step(tmp_path):
    trainer = swav_trainer(tmp_path, "--num_client", "1", "--batch_size", "8", "--freeze_prototypes_niters", "0",
                           *MULTI_CROP)
    batch = next(trainer.data.loaders.train.epoch(0))
    trainer.set_learning_rates(0, 0)
    client = copy.deepcopy(trainer.clients.models[0])
    server = copy.deepcopy(trainer.method.server)
    optimizer = torch.optim.SGD([*client.parameters(), *server.parameters()], lr=trainer.args.lr,
                                momentum=trainer.args.momentum, weight_decay=trainer.args.weight_decay)
    expected = _centralised_swav_loss(client, server, batch.crops, trainer.method)
    optimizer.zero_grad()
    expected.backward()
    optimizer.step()

    loss, _ = trainer.train_step(batch)

    assert torch.allclose(loss, expected.detach(), atol=1e-5)
    for expected_p, actual_p in zip(client.parameters(), trainer.clients.models[0].parameters()):
        assert torch.allclose(actual_p, expected_p, atol=1e-5)
    for expected_p, actual_p in zip(server.parameters(), trainer.method.server.parameters()):
        assert torch.allclose(actual_p, expected_p, atol=1e-5)


def test_rows_are_stacked_crop_major_across_clients(tmp_path):
    # Two clients start from identical weights, so the SFL loss must equal centralised SwAV on the crop-major
    # stack; stacking client-major pairs the wrong rows in Sinkhorn and the swapped prediction, and is caught.
    trainer = swav_trainer(tmp_path, "--num_client", "2", "--batch_size", "6", *MULTI_CROP)
    batch = next(trainer.data.loaders.train.epoch(0))
    assert batch.rows_per_client == [6, 6]
    client, server = copy.deepcopy(trainer.clients.models[0]), copy.deepcopy(trainer.method.server)
    with torch.no_grad():
        crop_major = _centralised_swav_loss(client, server, batch.crops, trainer.method)
        client_major = _centralised_swav_loss(client, server, batch.crops, trainer.method, client_major=True, clients=2)
        smashed = trainer.clients.forward(batch.crops, batch.client_ids, batch.rows_per_client)
        sfl, _ = trainer.method.compute_loss(smashed, [], StepContext(0, StepLayout.of(batch.client_ids,
                                                                                        batch.rows_per_client)))
    assert torch.allclose(sfl, crop_major, atol=1e-5)
    assert not torch.allclose(sfl, client_major, atol=1e-3)


def test_queue_fills_then_joins_the_sinkhorn_batch(tmp_path, monkeypatch):
    trainer = swav_trainer(tmp_path, "--num_client", "2", "--batch_size", "4", "--queue_length", "16",
                           "--epoch_queue_starts", "0", *MULTI_CROP)
    seen_rows = []
    real_sinkhorn = swav.sinkhorn_knopp
    monkeypatch.setattr(swav, "sinkhorn_knopp", lambda scores, *a, **k: seen_rows.append(scores.shape[0]) or real_sinkhorn(scores, *a, **k))
    for batch in list(trainer.data.loaders.train.epoch(0))[:3]:
        trainer.train_step(batch)
    # 8 rows per step and 2 assignment crops: the queue of 16 is full after two steps, then used.
    assert seen_rows == [8, 8, 8, 8, 24, 24]
    assert trainer.method.queue.is_full()


def test_queue_waits_for_epoch_queue_starts(tmp_path):
    trainer = swav_trainer(tmp_path, "--num_client", "2", "--batch_size", "4", "--queue_length", "8",
                           "--epoch_queue_starts", "1", *MULTI_CROP)
    for batch in list(trainer.data.loaders.train.epoch(0))[:3]:
        trainer.train_step(batch)
    assert not trainer.method.queue.is_full()
    assert torch.count_nonzero(trainer.method.queue.embeddings) == 0


def test_prototypes_stay_frozen_for_the_set_number_of_steps(tmp_path):
    trainer = swav_trainer(tmp_path, "--num_client", "2", "--batch_size", "4", "--freeze_prototypes_niters", "2",
                           *MULTI_CROP)
    prototypes = trainer.method.prototypes
    swav.normalize_prototypes_(prototypes)
    initial = prototypes.weight.detach().clone()
    batches = list(trainer.data.loaders.train.epoch(0))[:3]
    for batch in batches[:2]:
        trainer.train_step(batch)
        trainer.global_step += 1
        assert torch.allclose(prototypes.weight, initial)
    trainer.train_step(batches[2])
    assert not torch.allclose(prototypes.weight, initial)


def test_per_client_server_update_steps_the_server_once_per_client(tmp_path):
    joint = swav_trainer(tmp_path / "joint", "--num_client", "3", "--batch_size", "4", *MULTI_CROP,
                         "--freeze_prototypes_niters", "0")
    per_client = swav_trainer(tmp_path / "per_client", "--num_client", "3", "--batch_size", "4", *MULTI_CROP,
                              "--freeze_prototypes_niters", "0", "--server_update", "per_client")
    steps = []
    optimizer = per_client.split_step.server_optimizer
    optimizer.step = (lambda original: lambda *a, **k: steps.append(1) or original(*a, **k))(optimizer.step)
    batch = next(joint.data.loaders.train.epoch(0))
    joint.train_step(batch)
    per_client.train_step(batch)
    assert len(steps) == 3
    joint_weights = torch.cat([p.flatten() for p in joint.method.server.parameters()])
    per_client_weights = torch.cat([p.flatten() for p in per_client.method.server.parameters()])
    assert not torch.allclose(joint_weights, per_client_weights)


def test_half_precision_sinkhorn_is_why_the_seed_saw_nan():
    # The seed exponentiated scores / epsilon under autocast: in fp16, exp(scores / 0.05) overflows once a
    # score passes ~0.55, and the codes become NaN. Our Sinkhorn works in float32 log space.
    scores = torch.tensor([[0.9, 0.1, -0.3], [0.2, 0.8, 0.0]], dtype=torch.float16)
    naive = torch.exp(scores / 0.05)
    naive = naive / naive.sum()
    assert not torch.isfinite(naive).all()
    codes = swav.sinkhorn_knopp(scores, 0.05, 3)
    assert torch.isfinite(codes).all() and codes.dtype == torch.float32


def test_crop_options_are_validated():
    from configs import parse_args

    with pytest.raises(UserError, match="same length"):
        parse_args("swav", ["--nmb_crops", "2", "6", "--size_crops", "32"])
    with pytest.raises(UserError, match="crops_for_assign 8 is out of range"):
        parse_args("swav", ["--crops_for_assign", "0", "8"])


def test_swav_resume_continues_exactly_with_its_queue(tmp_path):
    import json

    from sfl_helpers import TINY_SWAV

    import run_sflswav
    from functions.core.checkpoint import CHECKPOINT_NAME, load_checkpoint

    def run(name, *extra):
        run_sflswav.main([*TINY_SWAV, *MULTI_CROP, "--num_client", "2", "--batch_size", "4", "--queue_length", "16",
                          "--epoch_queue_starts", "0", "--output_dir", str(tmp_path / name), *extra])
        return tmp_path / name

    straight = run("straight", "--max_steps", "6")
    run("split", "--max_steps", "3")
    split = run("split", "--max_steps", "6", "--resume")
    expected, actual = load_checkpoint(straight / CHECKPOINT_NAME), load_checkpoint(split / CHECKPOINT_NAME)
    for key, value in expected["method"].items():
        assert torch.equal(actual["method"][key], value), key
    assert torch.equal(actual["parts"]["method_extra"]["queue"]["embeddings"],
                       expected["parts"]["method_extra"]["queue"]["embeddings"])
    assert (json.loads((split / "metrics.json").read_text())["train_loss"]
            == json.loads((straight / "metrics.json").read_text())["train_loss"])


def test_monitors_from_summed_statistics_equal_the_local_ones():
    # Under torchrun the monitors are built from per-rank sums (all-reduced); in one process they must equal
    # the direct per-batch values, so summing over ranks gives the global ones.
    torch.manual_seed(0)
    codes = torch.softmax(torch.randn(12, 7) * 3, dim=1)
    embeddings = torch.randn(12, 5)
    summed = swav._global_monitor_values(codes, embeddings)
    assert torch.allclose(summed["code_entropy"], swav.code_entropy(codes), atol=1e-5)
    assert summed["prototypes_used"] == swav.prototypes_used(codes).float()
    assert torch.allclose(summed["embedding_std"], swav.embedding_std(embeddings), atol=1e-5)
