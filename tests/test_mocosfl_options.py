"""MocoSFL's options checked against MocoSFL's own definitions: its symmetric loss, per-client queues, the
parameter counts of its MoCo versions, FL-MoCo; divergence-aware FedAvg and loss-threshold communication saving in
the loop (their rules against MocoSFL's code: tests/test_golden_divergence.py, tests/test_golden_communication.py).

The MoCo step as a whole (BatchNorm heads, both queue kinds, the order of momentum updates and FedAvg) is compared
with MocoSFL's own code, step by step, in tests/test_golden_moco_step.py; the tests here write single rules out by
hand on a 3x3 linear server."""
from __future__ import annotations

import json

import pytest
import torch
from sfl_helpers import moco_trainer, swav_trainer
from test_moco_losses import reference_info_nce
from torch import nn

from configs import parse_args
from functions.core.distributed import Runtime
from functions.data.layout import StepLayout
from functions.methods.base import StepContext
from functions.methods.heads import LARGE_V2_HIDDEN, MOCO_VERSIONS, build_moco_head
from functions.methods.moco import MocoServer
from functions.sfl import communication
from functions.sfl.communication import FULL, REPLAY, UPLOAD_ONLY, next_status
from models.split import architecture, build_split_model

CPU = Runtime(device=torch.device("cpu"))


# ------------------------------------------------------------------------------------- a tiny MoCo server
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
NEGATIVES = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]]
TWO_CLIENTS = StepContext(0, StepLayout.of([0, 1], [1, 1]))  # row 0 from client 0, row 1 from client 1


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


# ---------------------------------------------------------------------------------------- parameter counts
def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k


def _resnet18_unit_parameters() -> list[int]:
    """ResNet-18 for 32x32 images as MocoSFL builds it: stem conv + norm, then 8 BasicBlocks (bias-free convs,
    norms with weight and bias, a 1x1 shortcut where the shape changes)."""
    units = [_conv(3, 64, 3) + 2 * 64]
    inputs = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            block_stride = stride if block == 0 else 1
            count = _conv(inputs, planes, 3) + _conv(planes, planes, 3) + 4 * planes
            if block_stride != 1 or inputs != planes:
                count += _conv(inputs, planes, 1) + 2 * planes
            units.append(count)
            inputs = planes
    return units


def _mocosfl_head_parameters(version: str, k_dim: int, mlp: bool) -> int:
    """MocoSFL's classifier: Linear(512, K_dim) without --mlp; largeV2: Linear(512, 4096), BatchNorm1d(4096),
    Linear(4096, K_dim); other V2 versions: Linear(512, K_dim), Linear(K_dim, K_dim) (all with biases)."""
    if not mlp:
        return 512 * k_dim + k_dim
    if version == "largeV2":
        return 512 * LARGE_V2_HIDDEN + LARGE_V2_HIDDEN + 2 * LARGE_V2_HIDDEN + LARGE_V2_HIDDEN * k_dim + k_dim
    return 512 * k_dim + k_dim + k_dim * k_dim + k_dim


@pytest.mark.parametrize("version", list(MOCO_VERSIONS))
def test_each_moco_version_has_mocosfls_parameter_count_at_every_cut(version):
    preset = MOCO_VERSIONS[version]
    units = _resnet18_unit_parameters()
    head = build_moco_head(512, version, preset.K_dim, preset.mlp)
    assert head.prototypes is None
    assert sum(p.numel() for p in head.projection.parameters()) == _mocosfl_head_parameters(version, preset.K_dim,
                                                                                            preset.mlp)
    args = parse_args("moco", ["--moco_version", version])
    for cut in range(1, architecture("ResNet18").num_cut_points + 1):
        split = build_split_model("ResNet18", cut, head=MocoServer.head_builder(args))
        client = sum(p.numel() for p in split.client.parameters())
        server = sum(p.numel() for p in split.server.parameters())
        assert client == sum(units[:cut]), cut
        assert server == sum(units[cut:]) + _mocosfl_head_parameters(version, preset.K_dim, preset.mlp), cut


def test_a_version_sets_its_options_unless_they_are_given():
    args = parse_args("moco", ["--moco_version", "V1"])
    assert (args.mlp, args.K_dim, args.pairloader_option, args.symmetric, args.cos) == (False, 128, "mocov1", False,
                                                                                        False)
    args = parse_args("moco", ["--moco_version", "largeV2", "--K_dim", "256", "--no-symmetric"])
    assert (args.mlp, args.K_dim, args.symmetric, args.cos) == (True, 256, False, True)


# ------------------------------------------------------------------------------ divergence-aware FedAvg
# Divergence-aware FedAvg's rule is checked against MocoSFL's own fedavg in tests/test_golden_divergence.py; here,
# that the loop runs it on its client engines and logs the divergences.
def _fedavg_around(trainer, monkeypatch) -> list[tuple[dict, dict]]:
    """Record the client weights just before and just after each FedAvg of the trainer."""
    from functions.train import trainer as simulator

    seen, real = [], simulator.fedavg

    def recording(clients, pool, *args, **kwargs):
        before = {k: v.clone() for k, v in clients.stacked_state(range(trainer.args.num_client)).items()}
        result = real(clients, pool, *args, **kwargs)
        seen.append((before, {k: v.clone() for k, v in clients.stacked_state(range(trainer.args.num_client)).items()}))
        return result

    monkeypatch.setattr(simulator, "fedavg", recording)
    return seen


@pytest.mark.parametrize("make, engine", [(moco_trainer, "vmap"), (moco_trainer, "loop"), (swav_trainer, "vmap")])
def test_divergence_awareness_mixes_each_client_by_one_mu_in_the_loop(tmp_path, monkeypatch, make, engine):
    # One step with a FedAvg after it (the first of --avg_freq 16 in the epoch).
    trainer = make(tmp_path, "--num_client", "2", "--num_epoch", "1", "--divergence_aware", "--divergence_measure",
                   "--div_lambda", "0.5", "--client_exec", engine, "--max_steps", "1", "--avg_freq", "16")
    seen = _fedavg_around(trainer, monkeypatch)
    trainer.train()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["client_divergence"][0][1] > 0
    before, after = seen[-1]
    names = [name for name, rows in before.items() if rows.is_floating_point()]
    average = {name: before[name].double().mean(dim=0) for name in names}  # synthetic shards are equal
    for client in range(2):
        # after - average = mu * (before - average), the same mu for every tensor of the client, 0 < mu < 1.
        own = torch.cat([(before[n][client].double() - average[n]).flatten() for n in names])
        mixed = torch.cat([(after[n][client].double() - average[n]).flatten() for n in names])
        mu = float(mixed @ own / (own @ own))
        assert 0 < mu < 1 and torch.allclose(mixed, mu * own, atol=1e-6)
    assert not trainer.divergence_aware.lambdas.isnan().any() and trainer.divergence_aware.rescaled.all()


def test_compat_divergence_awareness_leaves_the_pool_clients_as_they_are(tmp_path, monkeypatch):
    trainer = moco_trainer(tmp_path, "--num_client", "2", "--num_epoch", "1", "--divergence_aware",
                           "--compat", "mocosfl", "--max_steps", "1", "--avg_freq", "16")
    seen = _fedavg_around(trainer, monkeypatch)
    trainer.train()
    before, after = seen[-1]
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not trainer.divergence_aware.auto_scaler


# --------------------------------------------------------------------------- loss-threshold communication
def test_loss_threshold_statuses_follow_mocosfls_rule():
    threshold = 0.1
    assert next_status(FULL, 5.0, 4.99, threshold, epoch=10) == FULL         # warm-up epochs always communicate
    assert next_status(FULL, 5.0, 4.95, threshold, epoch=11) == UPLOAD_ONLY
    assert next_status(UPLOAD_ONLY, 4.95, 4.9, threshold, epoch=12) == REPLAY
    assert next_status(REPLAY, 4.9, 4.85, threshold, epoch=13) == REPLAY
    assert next_status(REPLAY, 4.9, 4.5, threshold, epoch=14) == FULL        # a fast fall: back to communicating
    assert next_status(UPLOAD_ONLY, 4.9, 5.2, threshold, epoch=14) == REPLAY  # a rise is no fall


def _client_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.clients.stacked_state(range(trainer.args.num_client)).items()}


def _server_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.method.server.state_dict().items()}


def _changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


@pytest.mark.parametrize("make, engine", [(moco_trainer, "vmap"), (moco_trainer, "loop"), (swav_trainer, "vmap")])
def test_upload_only_and_replay_epochs_leave_the_clients_unchanged_and_train_the_server(tmp_path, monkeypatch, make,
                                                                                       engine):
    monkeypatch.setattr(communication, "WARMUP_EPOCHS", 0)
    # After the first epoch (no loss to compare with yet) each epoch's loss falls by less than this threshold:
    # A, A, then B, then C (replaying the B epoch's smashed data).
    trainer = make(tmp_path, "--num_client", "2", "--num_epoch", "4", "--loss_threshold", "100", "--client_exec",
                   engine)
    statuses = []
    for _ in range(4):
        clients, server = _client_weights(trainer), _server_weights(trainer)
        statuses.append(trainer.communication.status)
        if trainer.communication.replaying:
            monkeypatch.setattr(trainer.data.loaders.train, "epoch", lambda *a, **k: pytest.fail("C read data"))
        trainer.train_epoch()
        assert _changed(server, _server_weights(trainer))
        assert _changed(clients, _client_weights(trainer)) == (statuses[-1] == FULL), statuses
    assert statuses == [FULL, FULL, UPLOAD_ONLY, REPLAY]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [status for _, status in metrics["communication_status"]] == [0, 0, 1, 2]
    saved = [value for _, value in metrics["communication_bytes_saved"]]
    assert saved[1] == 0 < saved[2] < saved[3]
    # C + B / 2 over the statuses the epochs trained in (MocoSFL's own count: tests/test_golden_communication.py).
    assert metrics["communication_epochs_saved"][-1][1] == statuses.count(REPLAY) + statuses.count(UPLOAD_ONLY) / 2


def test_without_a_loss_threshold_every_epoch_trains_the_clients(tmp_path, monkeypatch):
    monkeypatch.setattr(communication, "WARMUP_EPOCHS", 0)
    trainer = moco_trainer(tmp_path, "--num_client", "2", "--num_epoch", "3")
    assert trainer.communication is None
    for _ in range(3):
        clients = _client_weights(trainer)
        trainer.train_epoch()
        assert _changed(clients, _client_weights(trainer))


def test_communication_saving_resumes_in_its_status(tmp_path, monkeypatch):
    monkeypatch.setattr(communication, "WARMUP_EPOCHS", 0)
    trainer = moco_trainer(tmp_path, "--num_client", "2", "--num_epoch", "4", "--loss_threshold", "100")
    for _ in range(3):
        trainer.train_epoch()
    state = trainer.state_dict()
    resumed = moco_trainer(tmp_path / "again", "--num_client", "2", "--num_epoch", "4", "--loss_threshold", "100")
    resumed.communication.folder = trainer.communication.folder
    resumed.load_state_dict(state)
    assert resumed.communication.status == REPLAY and resumed.communication.bytes_saved > 0


# ------------------------------------------------------------------------------------------------- FL-MoCo
def test_fl_baseline_trains_whole_networks_on_the_clients_for_local_epochs(tmp_path):
    one = moco_trainer(tmp_path / "one", "--num_client", "2", "--scheme", "fl", "--local_epoch", "1")
    two = moco_trainer(tmp_path / "two", "--num_client", "2", "--scheme", "fl", "--local_epoch", "2")
    assert two.steps_per_epoch == 2 * one.steps_per_epoch
    assert list(two.split_step.server_optimizer.param_groups[0]["params"][0].shape) == [0]  # no server weights
    split = moco_trainer(tmp_path / "split", "--num_client", "2")
    fl_client, split_client = (sum(rows[0].numel() for rows in trainer.clients.stacked_state([0]).values())
                               for trainer in (two, split))
    assert fl_client > 10 * split_client  # the whole backbone and head, not the first layers
    before = _client_weights(two)
    two.train_epoch()
    assert two.global_step == two.steps_per_epoch
    assert _changed(before, _client_weights(two))


@pytest.mark.parametrize("scheme", ["sfl", "fl"])
def test_momentum_copies_move_as_the_next_step_begins_so_towards_the_fedavg_average(tmp_path, scheme):
    # MocoSFL moves a client's momentum copy in the client's forward (SFL) or at the start of its compute (FL):
    # after the FedAvg that followed the client's previous step. (SFL against MocoSFL's code: test_golden_moco_step.)
    trainer = moco_trainer(tmp_path, "--num_client", "2", "--scheme", scheme, "--no-symmetric")
    batches = trainer.data.loaders.train.epoch(0)
    first = next(batches)
    trainer.split_step(first, 0, 0)
    pool = list(first.client_ids)
    trainer.fedavg(pool)
    copies = trainer.clients.stacked_state(pool, momentum_copies=True)
    average = trainer.clients.stacked_state(pool)
    trainer.split_step(next(batches), 0, 1)
    moved = trainer.clients.stacked_state(pool, momentum_copies=True)
    for name, value in moved.items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.99 * copies[name] + 0.01 * average[name], atol=1e-6), name


def test_fl_baseline_refuses_split_only_options():
    with pytest.raises(Exception, match="FL-MoCo baseline"):
        parse_args("swav", ["--scheme", "fl"])
    with pytest.raises(Exception, match="loss_type moco"):
        parse_args("moco", ["--scheme", "fl", "--loss_type", "simco"])

