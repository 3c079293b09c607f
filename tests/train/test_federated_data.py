"""The data of a run: built from its typed option groups alone, and a run longer than the clients' sample streams can
address is refused before it starts."""
from __future__ import annotations

import pytest
import torch
from sfl_helpers import TINY_MOCO, moco_trainer

from configs import parse_args
from functions.core.distributed import Runtime
from functions.core.errors import UserError
from functions.core.options import (
    ClientOptions,
    DatasetOptions,
    LoaderOptions,
    PartitionOptions,
    RunLengthOptions,
)
from functions.data.datasets import resolved_entry
from functions.data.loaders import MAX_STREAM_POSITION
from functions.methods.registry import method_class
from functions.train.federated_data import FederatedData, check_run_length


def test_a_local_epoch_beyond_the_sample_streams_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"exceed the 1099511627776 samples a client's stream can address; lower "
                                        r"--num_epoch or --local_epoch 100000000000"):
        moco_trainer(tmp_path, "--scheme", "fl", "--local_epoch", "100000000000", "--num_client", "2",
                     "--client_exec", "loop")


def test_a_split_learning_run_beyond_the_sample_streams_names_num_epoch_only():
    length = RunLengthOptions(num_epoch=MAX_STREAM_POSITION // 8, scheme="sfl", local_epoch=5)
    check_run_length(length, steps_per_epoch=1, largest_batch=7)
    with pytest.raises(UserError, match=r"samples a client's stream can address; lower --num_epoch$"):
        check_run_length(length, steps_per_epoch=1, largest_batch=8)


def test_the_option_groups_alone_give_the_data_of_the_parsed_run(tmp_path):
    args = parse_args("moco", [*TINY_MOCO, "--num_client", "4", "--batch_size", "8", "--hetero",
                               "--output_dir", str(tmp_path / "parsed")])
    view_spec = method_class("moco").view_spec(args, resolved_entry("synthetic", None))
    runtime = Runtime(device=torch.device("cpu"))
    for folder in ("parsed", "grouped"):
        (tmp_path / folder).mkdir()
    parsed = FederatedData.from_args(args, view_spec, runtime, tmp_path / "parsed")
    grouped = FederatedData(
        view_spec, runtime, tmp_path / "grouped",
        dataset=DatasetOptions(dataset="synthetic", data_dir=args.data_dir, data_proportion=1.0, data_size=None,
                               seed=3),
        partition=PartitionOptions(partition="iid", dirichlet_alpha=0.4, noniid_ratio=1.0, min_client_samples=10,
                                   hetero=True, hetero_string="0.2_0.8|16|0.8_0.2", num_client=4, seed=3),
        clients=ClientOptions(num_client=4, batch_size=8, hetero=True, client_sample_ratio=1.0),
        loaders=LoaderOptions(use_dali=False, dali_device=None, eval_batch_size=512, num_workers=0, seed=3),
        length=RunLengthOptions(num_epoch=2, scheme="sfl", local_epoch=5))
    assert grouped.partition_hash == parsed.partition_hash
    assert grouped.batch_sizes == parsed.batch_sizes
    assert grouped.steps_per_epoch == parsed.steps_per_epoch
    assert grouped.pool(1) == parsed.pool(1)
    assert (tmp_path / "grouped" / "partition.json").read_text() == (tmp_path / "parsed" / "partition.json").read_text()
