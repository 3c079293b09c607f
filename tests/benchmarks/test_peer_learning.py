"""benchmarks/peer_learning.py without training: its command lines, log parsing and table."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from paths import REPO_ROOT

from functions.core.errors import UserError

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import peer_learning  # noqa: E402

PEER_LOG = """\
2026-12-03 09:00:00 - SFL-Moco-microbatch (Moco-V2, Hetero: False, Sample_Ratio: 1.0) Train on cifar10 with cutlayer 2 \
and 10 clients with 1.0-data-distribution: total epochs: 2, total number of batches for each client is 33
2026-12-03 09:01:00 - epoch:1, knn_val_accu: 21.34, contrast_loss: 8.73, contrast_acc: 3.12
2026-12-03 09:02:00 - epoch:2, knn_val_accu: 24.50, contrast_loss: 8.41, contrast_acc: 5.00
2026-12-03 09:02:30 - final knn evaluation accuracy is 24.50
"""


def _options(*extra: str):
    return peer_learning.build_parser().parse_args(["--peer_dir", "peer", "--data_dir", "data", *extra])


def test_mocosfl_log_gives_steps_and_per_epoch_figures() -> None:
    parsed = peer_learning.parse_peer_log(PEER_LOG)
    assert parsed == {"steps_per_epoch": 33, "epochs": [{"epoch": 1, "knn": 21.34, "loss": 8.73},
                                                        {"epoch": 2, "knn": 24.5, "loss": 8.41}]}


def test_own_metrics_give_the_mean_loss_of_each_epochs_steps() -> None:
    metrics = {"steps_per_epoch": 2, "train_loss": [[1, 4.0], [2, 2.0], [3, 1.0], [4, 0.0]],
               "knn_acc": [[0, 10.0], [1, 20.0], [2, 30.0]]}
    parsed = peer_learning.parse_own_metrics(metrics)
    assert parsed == {"steps_per_epoch": 2, "epochs": [{"epoch": 0, "knn": 10.0, "loss": None},
                                                       {"epoch": 1, "knn": 20.0, "loss": 3.0},
                                                       {"epoch": 2, "knn": 30.0, "loss": 0.5}]}


def test_table_has_mean_and_spread_over_seeds_and_dashes_for_missing_cells() -> None:
    records = [
        {"side": "mocosfl", "seed": 0, "seconds": 60, "steps_per_epoch": 33, "epochs": [{"epoch": 1, "knn": 20.0, "loss": 8.0}]},
        {"side": "mocosfl", "seed": 1, "seconds": 60, "steps_per_epoch": 33, "epochs": [{"epoch": 1, "knn": 22.0, "loss": 8.0}]},
        {"side": "ours", "seed": 0, "seconds": 30, "steps_per_epoch": 33,
         "epochs": [{"epoch": 0, "knn": 10.0, "loss": None}, {"epoch": 1, "knn": 25.0, "loss": 7.5}]},
    ]
    table = peer_learning.format_table(records, ["mocosfl", "ours"]).splitlines()
    assert table[0] == "| epoch | kNN % MocoSFL | kNN % this project | loss MocoSFL | loss this project |"
    assert table[2] == "| 0 | - | 10.00 | - | - |"
    assert table[3] == "| 1 | 21.00 ± 1.41 | 25.00 | 8.000 ± 0.000 | 7.500 |"
    footer = peer_learning.format_footer(records, ["mocosfl", "ours"])
    assert footer == ("MocoSFL: seeds 0, 1, steps per epoch 33, 1.0 min per run; "
                      "this project: seeds 0, steps per epoch 33, 0.5 min per run")


def test_both_sides_get_the_same_shared_settings(tmp_path) -> None:
    options = _options("--epochs", "3", "--clients", "4", "--own_extra", "--compat mocosfl")
    peer = peer_learning.peer_command(options, 7, tmp_path / "peer")
    own = peer_learning.own_command(options, 7, tmp_path / "own")
    shared = peer_learning.shared_options(options, 7)
    assert peer[1:1 + len(shared)] == shared and own[2:2 + len(shared)] == shared
    assert own[-2:] == ["--compat", "mocosfl"]
    assert own[own.index("--width") + 1] == "16" and own[own.index("--partition") + 1] == "iid"
    assert shared[shared.index("--num_epoch") + 1] == "3" and shared[shared.index("--seed") + 1] == "7"


def test_the_worker_is_given_every_setting_it_rebuilds_the_command_from() -> None:
    options = _options("--width", "8", "--K", "512", "--lr", "0.03")
    worker = peer_learning.build_parser().parse_args(
        ["--peer_dir", "peer", "--data_dir", "data", *peer_learning.worker_options(options)])
    assert peer_learning.shared_options(worker, 1) == peer_learning.shared_options(options, 1)
    assert worker.width == 8


def test_a_folder_that_is_not_a_mocosfl_checkout_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(UserError, match="is not a MocoSFL checkout .no run_sflmoco.py"):
        peer_learning.main(["--peer_dir", str(tmp_path), "--data_dir", str(tmp_path)])


def test_a_data_folder_without_cifar_batches_is_one_clear_error(tmp_path) -> None:
    peer = tmp_path / "peer"
    for name in peer_learning.PEER_FILES:
        (peer / name).parent.mkdir(parents=True, exist_ok=True)
        (peer / name).write_text("")
    with pytest.raises(UserError, match="no cifar-10-batches-py"):
        peer_learning.main(["--peer_dir", str(peer), "--data_dir", str(Path(tmp_path) / "nothing")])


def test_backbone_knn_lines_join_their_epochs_and_get_a_column() -> None:
    parsed = peer_learning.merge_backbone_knn(peer_learning.parse_peer_log(PEER_LOG),
                                              ['{"epoch": 1, "knn_backbone": 30.5}', "", '{"epoch": 2, "knn_backbone": 31}'])
    assert [row["knn_backbone"] for row in parsed["epochs"]] == [30.5, 31.0]
    records = [{"side": "mocosfl", "seed": 0, "seconds": 1, "steps_per_epoch": 33, **parsed},
               {"side": "ours", "seed": 0, "seconds": 1, "steps_per_epoch": 33,
                "epochs": [{"epoch": 1, "knn": 25.0, "loss": 7.5}]}]
    table = peer_learning.format_table(records, ["mocosfl", "ours"]).splitlines()
    assert table[0] == ("| epoch | kNN % MocoSFL | kNN % MocoSFL backbone | kNN % this project | loss MocoSFL | "
                        "loss this project |")
    assert table[2] == "| 1 | 21.34 | 30.50 | 25.00 | 8.730 | 7.500 |"


def test_weighted_knn_votes_by_similarity() -> None:
    import torch

    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # The first query's nearest neighbour is class 0, but with k = 3 the two class-1 votes outweigh it only when the
    # temperature is high; at t = 0.1 exp(10) for the exact match wins.
    assert peer_learning.weighted_knn_accuracy(bank, labels, queries, torch.tensor([0, 1]), 2, k=3) == 100.0
    assert peer_learning.weighted_knn_accuracy(bank, labels, queries, torch.tensor([0, 1]), 2, k=3,
                                               temperature=100.0) == 50.0
