"""Loop pieces: learning-rate schedules, FedAvg positions, heterogeneous clients, eval-only, AMP on CPU."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from sfl_helpers import TINY_MOCO, moco_trainer

import run_sflmoco
from configs import parse_args
from functions.core.options import ClientOptions
from functions.data.partition import hetero_partition
from functions.methods.schedules import LearningRateSchedule
from functions.methods.swav import SwavServer
from functions.sfl.fedavg import fedavg_positions
from functions.train.federated_data import client_batch_sizes


def test_cosine_schedule_steps_once_per_epoch_for_server_and_clients():
    args = parse_args("moco", ["--cos", "--lr", "0.1", "--c_lr", "0.2", "--num_epoch", "10"])
    schedule = LearningRateSchedule(args, steps_per_epoch=50)
    assert schedule.rates(0, 0) == pytest.approx((0.1, 0.2))
    assert schedule.rates(0, 49) == schedule.rates(0, 0)  # constant within an epoch
    factor = 0.5 * (1 + math.cos(math.pi * 5 / 10))
    assert schedule.rates(5, 17) == pytest.approx((0.1 * factor, 0.2 * factor))


def test_multistep_schedule_has_separate_server_and_client_gammas():
    args = parse_args("moco", ["--lr", "1", "--milestones", "3", "6", "--s_gamma", "0.5", "--c_gamma", "0.1", "--no-cos"])
    schedule = LearningRateSchedule(args, steps_per_epoch=10)
    assert schedule.rates(2, 9) == pytest.approx((1.0, 1.0))
    assert schedule.rates(3, 0) == pytest.approx((0.5, 0.1))
    assert schedule.rates(7, 0) == pytest.approx((0.25, 0.01))


def test_swav_scheduler_warms_up_per_step_then_decays_to_the_final_lr():
    args = parse_args("swav", ["--use_swav_scheduler", "--lr", "0.4", "--start_warmup", "0", "--warmup_epochs", "2",
                               "--final_s_lr", "0.004", "--num_epoch", "10"])
    schedule = SwavServer.learning_rate_schedule(args, steps_per_epoch=10)
    assert schedule.per_step  # the loop sets the rates before every step
    # SwAV's np.linspace(start, base, 20 warm-up steps): the 20th step (epoch 1, step 9) reaches the base rate.
    assert schedule.rates(0, 0)[0] == pytest.approx(0.0)
    assert schedule.rates(1, 0)[0] == pytest.approx(0.4 * 10 / 19)
    assert schedule.rates(1, 9)[0] == pytest.approx(0.4)
    assert schedule.rates(2, 0)[0] == pytest.approx(0.4)
    assert schedule.rates(9, 9)[0] == pytest.approx(0.004, abs=2e-4)
    assert schedule.rates(5, 3)[1] == schedule.rates(5, 3)[0]  # --final_c_lr -1 follows the server


def test_fedavg_runs_avg_freq_times_per_epoch_the_last_at_the_end():
    assert fedavg_positions(10, 1) == {9}
    assert fedavg_positions(10, 2) == {4, 9}
    assert fedavg_positions(3, 5) == {0, 1, 2}


def test_hetero_clients_send_rows_in_proportion_to_their_data():
    parts = hetero_partition(1000, 10, "0.2_0.8|16|0.8_0.2", seed=0)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 1000 and len(np.unique(np.concatenate(parts))) == 1000
    assert sizes[:2] == [400, 400] and all(size == 25 for size in sizes[2:])
    args = parse_args("moco", ["--hetero", "--batch_size", "4"])
    batches = client_batch_sizes(ClientOptions.from_args(args), sizes)
    assert batches[:2] == [16, 16] and batches[2:] == [1] * 8


def test_hetero_step_routes_unequal_rows(tmp_path):
    trainer = moco_trainer(tmp_path, "--num_client", "4", "--hetero", "--hetero_string", "0.25_0.75|9|0.75_0.25",
                           "--batch_size", "4")
    batch = next(trainer.data.loaders.train.epoch(0))
    assert batch.rows_per_client[0] > batch.rows_per_client[1] == batch.rows_per_client[3]
    loss, _ = trainer.train_step(batch)
    assert math.isfinite(float(loss))


def test_eval_only_reports_the_saved_run(tmp_path):
    output_dir = tmp_path / "run"
    trained = run_sflmoco.main([*TINY_MOCO, "--num_client", "2", "--batch_size", "8", "--max_steps", "2",
                                "--output_dir", str(output_dir)])
    evaluated = run_sflmoco.main(["--eval_only", "--checkpoint", str(output_dir / "checkpoint_last.pt"),
                                  "--skip_linear", "--num_workers", "0"])
    assert evaluated["knn_acc"] == pytest.approx(trained["knn_acc"])
    assert evaluated["step"] == 2
    assert json.loads((output_dir / "eval_only" / "metrics.json").read_text())["final"]["step"] == 2


def test_fp16_on_cpu_warns_and_trains_in_full_precision(tmp_path, caplog):
    logger = logging.getLogger("sfl")
    logger.addHandler(caplog.handler)  # the run logger does not propagate to the root logger
    try:
        trainer = moco_trainer(tmp_path, "--use_fp16")
    finally:
        logger.removeHandler(caplog.handler)
    assert trainer.precision.amp_dtype is None and not trainer.precision.scaler.is_enabled()
    assert any("--use_fp16 needs CUDA" in record.getMessage() for record in caplog.records)


def test_compiled_server_trains_like_the_plain_one(tmp_path):
    import torch

    plain = moco_trainer(tmp_path / "plain", "--num_client", "2", "--batch_size", "4")
    compiled = moco_trainer(tmp_path / "compiled", "--num_client", "2", "--batch_size", "4", "--compile")
    batch = next(plain.data.loaders.train.epoch(0))
    for trainer in (plain, compiled):
        trainer.set_learning_rates(0, 0)
    plain_loss, _ = plain.train_step(batch)
    compiled_loss, _ = compiled.train_step(batch)
    assert torch.allclose(compiled_loss, plain_loss, atol=1e-4)
    assert plain.method.state_dict().keys() == compiled.method.state_dict().keys()
    assert getattr(compiled.method.server, "_compiled_call_impl", None) is not None
    assert getattr(plain.method.server, "_compiled_call_impl", None) is None
