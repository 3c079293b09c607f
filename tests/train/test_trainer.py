"""Loop pieces: learning-rate schedules, FedAvg positions, heterogeneous clients, eval-only, AMP on CPU."""
from __future__ import annotations

import json
import logging
import math
import signal

import numpy as np
import pytest
import torch
from entry_runs import (
    FAST,
    cli_error,
)
from sfl_helpers import TINY_MOCO, moco_trainer, overflow_at

import run_sflmoco
from configs import parse_args
from functions.core.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
)
from functions.core.errors import TrainingInterrupted, UserError
from functions.core.options import ClientOptions
from functions.data.partition import hetero_partition
from functions.methods.schedules import LearningRateSchedule
from functions.methods.swav import SwavServer
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


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    trainer.args.max_steps = 1
    trainer.train()
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    trainer.args.max_steps = 4
    overflow_at(trainer, step=3)
    with pytest.raises(UserError, match=r"the loss became inf at step 3; .*last good checkpoint .* \(step 1\)"):
        trainer.train()
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    trainer.save_checkpoint()
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with torch.no_grad():
        next(trainer.method.server.parameters())[0].fill_(float("nan"))
    with pytest.raises(UserError, match=r"method\.server\..* became non-finite by step 0; stopped without saving"):
        trainer.save_checkpoint()
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good


def test_the_same_seed_gives_the_same_partition_and_first_losses_on_cpu(tmp_path):
    def first_losses(name: str, seed: str) -> tuple[str, list[float]]:
        trainer = moco_trainer(tmp_path / name, "--client_exec", "loop", "--num_client", "3", "--batch_size", "8",
                               "--partition", "dirichlet", "--seed", seed)
        trainer.set_learning_rates(0, 0)
        batches = trainer.data.loaders.train.epoch(0)
        return trainer.data.partition_hash, [float(trainer.train_step(next(batches))[0]) for _ in range(2)]

    hash_a, losses_a = first_losses("a", "11")
    hash_b, losses_b = first_losses("b", "11")
    hash_c, losses_c = first_losses("c", "12")
    assert hash_a == hash_b and losses_a == losses_b
    assert hash_c != hash_a and losses_c != losses_a


def test_resuming_with_another_num_epoch_is_refused_when_the_schedule_depends_on_it(tmp_path, capsys):
    cosine, steps = tmp_path / "cosine", tmp_path / "steps"
    run_sflmoco.main([*FAST, "--cos", "--output_dir", str(cosine), "--max_steps", "1"])
    code, line = cli_error(run_sflmoco.main, [*FAST, "--cos", "--output_dir", str(cosine), "--resume",
                                              "--num_epoch", "5", "--max_steps", "2"], capsys)
    assert code == 2 and "--num_epoch 2, this run has --num_epoch 5" in line
    run_sflmoco.main([*FAST, "--no-cos", "--milestones", "1", "--output_dir", str(steps), "--max_steps", "1"])
    resumed = run_sflmoco.main([*FAST, "--no-cos", "--milestones", "1", "--output_dir", str(steps), "--resume",
                                "--num_epoch", "5", "--max_steps", "2"])
    assert resumed["step"] == 2  # a MultiStepLR schedule does not depend on it: the run goes on


def test_a_resumed_epoch_reports_each_statistic_once_over_all_its_steps(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    steps = 6
    run_sflmoco.main([*FAST, "--output_dir", str(straight), "--max_steps", str(steps)])
    run_sflmoco.main([*FAST, "--output_dir", str(interrupted), "--max_steps", "2"])
    run_sflmoco.main([*FAST, "--output_dir", str(interrupted), "--max_steps", str(steps), "--resume"])
    expected, actual = (json.loads((folder / "metrics.json").read_text()) for folder in (straight, interrupted))
    [(epoch, value)], [(expected_epoch, expected_value)] = actual["contrastive_acc"], expected["contrastive_acc"]
    assert epoch == expected_epoch == 1 and value == pytest.approx(expected_value)
    assert actual["train_loss"] == expected["train_loss"]


def test_resuming_a_checkpoint_of_step_zero_logs_the_first_knn_once(tmp_path):
    trainer = moco_trainer(tmp_path, "--eval_freq", "1", "--client_exec", "loop", "--num_client", "2",
                           "--batch_size", "8")
    real_log_knn = trainer.log_knn

    def log_knn_then_stop(epoch):  # a stop that arrives during the first kNN monitor
        accuracy = real_log_knn(epoch)
        trainer.stop.request(signal.SIGTERM)
        return accuracy

    trainer.log_knn = log_knn_then_stop
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["global_step"] == 0
    resumed = moco_trainer(tmp_path, "--eval_freq", "1", "--client_exec", "loop", "--num_client", "2",
                           "--batch_size", "8", "--max_steps", "1")
    resumed.load_state_dict(state)
    resumed.train()
    knn = json.loads((tmp_path / "metrics.json").read_text())["knn_acc"]
    assert [epoch for epoch, _ in knn] == [0]


def _first(context) -> dict:
    return {"first": 1.0}


def _broken(context) -> dict:
    raise UserError("--aux_data: no such images")


def _stopped(context) -> dict:
    raise TrainingInterrupted("SIGTERM received during the final evaluation", signal.SIGTERM)


def _last(context) -> dict:
    return {"last": 2.0}


def test_a_failing_final_evaluation_is_reported_beside_the_others(tmp_path):
    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    trainer.evaluations = [_first, _broken, _last]
    with pytest.raises(UserError, match=r"final evaluation failed \(_broken: --aux_data: no such images\); the other "
                                        r"results are saved in .*metrics.json"):
        trainer.final_evaluation()
    final = json.loads((tmp_path / "metrics.json").read_text())["final"]
    assert final["first"] == 1.0 and final["last"] == 2.0 and final["model"] == CHECKPOINT_NAME
    assert final["failed"] == {"_broken": "--aux_data: no such images"}


def test_results_are_saved_before_a_later_evaluation_is_stopped(tmp_path):
    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    trainer.evaluations = [_first, _stopped, _last]
    with pytest.raises(TrainingInterrupted):
        trainer.final_evaluation()
    final = json.loads((tmp_path / "metrics.json").read_text())["final"]
    assert final["first"] == 1.0 and "last" not in final and final["step"] == 0
