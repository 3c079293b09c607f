"""FL-MoCo, the federated baseline: whole networks on the clients for local epochs, and where its momentum copies move."""
from __future__ import annotations

import pytest
import torch
from sfl_helpers import client_weights, moco_trainer, weights_changed

from configs import parse_args


def test_fl_baseline_trains_whole_networks_on_the_clients_for_local_epochs(tmp_path):
    short = ("--num_client", "2", "--data_proportion", "0.125", "--batch_size", "16")  # epochs of a few steps
    one = moco_trainer(tmp_path / "one", *short, "--scheme", "fl", "--local_epoch", "1")
    two = moco_trainer(tmp_path / "two", *short, "--scheme", "fl", "--local_epoch", "2")
    assert two.steps_per_epoch == 2 * one.steps_per_epoch
    assert list(two.split_step.server_optimizer.param_groups[0]["params"][0].shape) == [0]  # no server weights
    split = moco_trainer(tmp_path / "split", "--num_client", "2")
    fl_client, split_client = (sum(rows[0].numel() for rows in trainer.clients.stacked_state([0]).values())
                               for trainer in (two, split))
    assert fl_client > 10 * split_client  # the whole backbone and head, not the first layers
    before = client_weights(two)
    two.train_epoch()
    assert two.global_step == two.steps_per_epoch
    assert weights_changed(before, client_weights(two))


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
