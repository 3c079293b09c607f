"""Mixed precision: fp16 overflow steps are skipped and counted; a diverging loss scale stops the run."""
from __future__ import annotations

import json

import pytest
import torch
from entry_runs import (
    server_weights,
)
from sfl_helpers import moco_trainer, overflow_at

from functions.core.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
)
from functions.core.errors import UserError


def test_fp16_overflow_steps_are_skipped_counted_and_logged_not_fatal(tmp_path):
    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    # CUDA is not needed to exercise the loss-scaling bookkeeping: the CPU GradScaler skips steps the same way.
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    trainer.args.max_steps = 1
    trainer.train()
    after_first = server_weights(trainer)
    overflow_at(trainer, step=2)
    trainer.args.max_steps = 2
    trainer.train()
    for name, value in server_weights(trainer).items():
        assert torch.equal(value, after_first[name]), name  # the overflowing step did not update the server
    trainer.args.max_steps = 3
    trainer.train()
    assert any(not torch.equal(value, after_first[name]) for name, value in server_weights(trainer).items())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_steps"] == [[1, 0], [2, 1], [3, 1]]
    assert [step for step, _ in metrics["train_loss"]] == [1, 3]  # the skipped step's inf loss is not logged
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["skipped_steps"] == 1
    assert trainer.precision.scaler.get_scale() == 2.0 ** 7


def test_fp16_stops_when_the_loss_scale_shows_divergence(tmp_path):
    trainer = moco_trainer(tmp_path, "--client_exec", "loop", "--num_client", "2", "--batch_size", "8")
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    overflow_at(trainer, step=1)
    trainer.args.max_steps = 2
    with pytest.raises(UserError, match=r"fp16 loss scale fell to 0\.5 by step 1 \(1 steps skipped\)"):
        trainer.train()
    assert not (tmp_path / CHECKPOINT_NAME).exists()
