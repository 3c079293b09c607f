"""Short learning checks on real CIFAR-10 images: the loss goes down, SwAV does not collapse."""
from __future__ import annotations

import json

import numpy as np

import run_sflmoco


def _losses(output_dir) -> np.ndarray:
    return np.array([loss for _, loss in json.loads((output_dir / "metrics.json").read_text())["train_loss"]])


def test_sflmoco_lowers_the_loss_on_real_images(cifar10_mini_dir, tmp_path):
    output_dir = tmp_path / "moco"
    run_sflmoco.main(["--data_dir", str(cifar10_mini_dir), "--output_dir", str(output_dir), "--width", "8",
                      "--num_client", "5", "--partition", "dirichlet", "--batch_size", "16", "--K", "512",
                      "--K_dim", "64", "--symmetric", "--lr", "0.06", "--max_steps", "40", "--num_epoch", "1",
                      "--eval_freq", "0", "--skip_linear", "--num_workers", "0", "--log_freq", "10"])
    losses = _losses(output_dir)
    assert len(losses) == 40
    # The first steps see a queue of random keys (an easy task); the loss peaks once real keys fill it.
    assert losses[-8:].mean() < losses[4:12].mean() - 0.5, losses
