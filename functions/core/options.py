"""Typed groups of the resolved options, each built from the namespace of configs.parse_args, for the parts that
need one concern's options only (and can be called without a whole namespace); `typed_options` fills any
dataclass of run options (a FedAvg rule's, a privacy defence's)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar

from functions.core.compat import mocosfl_compat

Options = TypeVar("Options")


def typed_options(options_type: type[Options], args: argparse.Namespace) -> Options:
    """The dataclass `options_type` filled from the run options of the same names."""
    if not is_dataclass(options_type):
        raise TypeError(f"{options_type.__name__} is not a dataclass of run options")
    values: dict[str, Any] = {field.name: getattr(args, field.name) for field in fields(options_type)}
    return options_type(**values)


Group = TypeVar("Group", bound="OptionGroup")


class OptionGroup:
    """Base of a dataclass of run options whose fields are option names: `from_args` fills it from a namespace."""

    @classmethod
    def from_args(cls: type[Group], args: argparse.Namespace) -> Group:
        """The group of a parsed namespace."""
        return typed_options(cls, args)


@dataclass(frozen=True)
class ClientOptions(OptionGroup):
    """The simulated clients: how many, their batch, and how they are sampled into each epoch's pool."""

    num_client: int
    batch_size: int              # rows per client per step (the mean one under --hetero)
    hetero: bool                 # batches proportional to the clients' data sizes
    client_sample_ratio: float   # fraction of the clients in each epoch's pool


@dataclass(frozen=True)
class ScheduleOptions:
    """The learning rates over the run: --lr and --c_lr, and --cos or MultiStepLR."""

    lr: float
    c_lr: float
    cos: bool
    milestones: tuple[int, ...] | None  # None: the method's default milestones
    s_gamma: float
    c_gamma: float | None               # None: the method's default client factor
    num_epoch: int
    client_sample_ratio: float
    scheme: str                         # sfl, or fl (MocoSFL's FL-MoCo baseline)
    mocosfl_compat: bool                # --compat mocosfl

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ScheduleOptions:
        """The group of a parsed namespace."""
        milestones = None if args.milestones is None else tuple(args.milestones)
        return cls(lr=args.lr, c_lr=args.c_lr, cos=bool(args.cos), milestones=milestones, s_gamma=args.s_gamma,
                   c_gamma=args.c_gamma, num_epoch=args.num_epoch, client_sample_ratio=args.client_sample_ratio,
                   scheme=getattr(args, "scheme", "sfl"), mocosfl_compat=mocosfl_compat(args))


@dataclass(frozen=True)
class DatasetOptions(OptionGroup):
    """The run's images: which dataset, where it lies, and the subset of its training set that is used."""

    dataset: str
    data_dir: str
    data_proportion: float   # fraction of the training set kept
    data_size: int | None    # image side; None: the dataset's own
    seed: int                # seed of the subsample


@dataclass(frozen=True)
class PartitionOptions(OptionGroup):
    """How the training set is split across the clients (the method already resolved by finalize_args)."""

    partition: str               # iid, shard or dirichlet
    dirichlet_alpha: float
    noniid_ratio: float
    min_client_samples: int
    hetero: bool                 # with an iid partition: client sizes follow hetero_string
    hetero_string: str
    num_client: int
    seed: int                    # seed of the split


@dataclass(frozen=True)
class LoaderOptions(OptionGroup):
    """How the images reach the model: the torch or DALI data path, its workers and the evaluation batch."""

    use_dali: bool
    dali_device: str | None      # None: gpu when CUDA is present
    eval_batch_size: int
    num_workers: int
    seed: int                    # seed of the clients' sample streams and of each epoch's client pool


@dataclass(frozen=True)
class RunLengthOptions(OptionGroup):
    """How long the run trains: its epochs, and under --scheme fl each client's passes over its data per epoch."""

    num_epoch: int
    scheme: str                  # sfl, or fl (MocoSFL's FL-MoCo baseline)
    local_epoch: int
