"""Every command-line option of the entry scripts, YAML presets (--config), and validation.

Option names follow the seed scripts (MocoSFL and its SwAV descendant). The loop's options are here; each
registered method adds its own group (functions.server_method). `parse_args(method, argv)` returns the resolved
options; values come from, in increasing priority: the defaults here, the `--config` YAML
file, the command line.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from functions.datasets import dataset_names
from functions.errors import UserError
from functions.files import write_text_atomic
from functions.partition import add_partition_arguments, parse_hetero_string, resolve_partition_method
from functions.server_method import method_class
from models.split import ARCHITECTURES, check_cutlayer

CONFIG_DIR = Path(__file__).resolve().parent

# Options that do not change what a run computes: a resumed run may change them freely.
RUNTIME_OPTIONS = frozenset({
    "config", "resume", "checkpoint", "eval_only", "output_dir", "data_dir", "device", "num_workers",
    "num_epoch", "max_steps", "eval_freq", "linear_epochs", "skip_linear", "knn_k", "knn_t",
    "log_freq", "eval_batch_size", "client_exec", "is_distributed", "compile",
    "channels_last", "cudnn_benchmark",
})


def build_parser(method: str) -> argparse.ArgumentParser:
    """The parser of the entry script of a registered method: the loop's options, then the method's own."""
    method_cls = method_class(method)
    parser = argparse.ArgumentParser(
        prog=method_cls.entry_script or None,
        description=f"Split federated self-supervised learning with {method_cls.description or method_cls.name}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=str, default=None,
                        help="YAML file of option values (keys = option names without --); the command line overrides it")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", type=str, default=None,
                     help="run folder (config, partition, logs, tensorboard, metrics.json, checkpoints); "
                          "default ./outputs/<method>_<dataset>_<arch>_cut<cutlayer>_client<num_client>_seed<seed>")
    run.add_argument("--seed", type=int, default=1234, help="seed of the partition, client sampling, augmentations and initial weights")
    run.add_argument("--device", type=str, default=None,
                     help="torch device (cuda, cuda:1, cpu); default: cuda when present, else cpu; under torchrun the local rank's GPU")
    run.add_argument("--resume", action="store_true", help="continue training from checkpoint_last.pt in --output_dir")
    run.add_argument("--checkpoint", type=str, default=None, help="checkpoint file to evaluate with --eval_only")
    run.add_argument("--eval_only", action="store_true", help="only evaluate --checkpoint (kNN, linear and semi-supervised probes)")
    run.add_argument("--num_workers", type=int, default=2, help="data-loading worker processes of the torch data path")
    run.add_argument("--log_freq", type=int, default=20, help="training steps between progress-bar / loss-log updates")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the server part (first steps slower while it compiles; off by default)")
    run.add_argument("--channels_last", action="store_true",
                     help="convolutions in the NHWC (channels_last) memory layout, clients and server; same results "
                          "up to rounding (see the README's speed section)")
    run.add_argument("--cudnn_benchmark", action="store_true",
                     help="let cuDNN time its convolution algorithms and keep the fastest (CUDA; faster for fixed "
                          "shapes, but runs are no longer bit-reproducible)")
    run.add_argument("--is_distributed", action="store_true",
                     help="accepted for compatibility with the seed scripts; torchrun's environment decides")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", type=str, default="cifar10", choices=dataset_names(),
                      help="training data set (synthetic = small random images, for tests)")
    data.add_argument("--data_dir", type=str, default="./data",
                      help="folder holding cifar-10-batches-py/ or cifar-100-python/ (downloaded when missing)")
    data.add_argument("--data_proportion", type=float, default=1.0, help="fraction of the training set to use")
    data.add_argument("--use_dali", action="store_true", help="augment with NVIDIA DALI instead of torchvision")
    data.add_argument("--dali_device", type=str, default=None, choices=["gpu", "cpu"],
                      help="where DALI runs its operators; default gpu when CUDA is present")

    sfl = parser.add_argument_group("split federated learning")
    sfl.add_argument("--num_client", type=int, default=10, help="number of simulated clients")
    sfl.add_argument("--cutlayer", type=int, default=1, help="client keeps this many ResNet units (1 = stem only, 2 = stem + first block, ...)")
    sfl.add_argument("--batch_size", type=int, default=64, help="samples per client per step")
    sfl.add_argument("--client_sample_ratio", type=float, default=1.0, help="fraction of clients in the pool, redrawn each epoch")
    sfl.add_argument("--avg_freq", type=int, default=1, help="FedAvg of client models this many times per epoch")
    sfl.add_argument("--client_exec", type=str, default="vmap", choices=["vmap", "loop"],
                     help="client simulation: the whole pool in one vectorised pass over stacked per-client weights, "
                          "or a Python loop over per-client models (same results; vmap is faster)")
    sfl.add_argument("--hetero", action="store_true",
                     help="heterogeneous clients: each client's batch is proportional to its data size (rich clients send more rows)")
    sfl.add_argument("--hetero_string", type=str, default="0.2_0.8|16|0.8_0.2",
                     help="with --hetero and --partition iid: 'A_B|C|D_E' = a fraction A of clients holds a fraction B of the "
                          "data (the others, D, hold E); C is the rich clients' batch multiplier")
    add_partition_arguments(parser)

    model = parser.add_argument_group("model")
    model.add_argument("--arch", type=str, default="ResNet18",
                       help=f"split backbone: {', '.join(entry.name for entry in ARCHITECTURES.values())}")
    model.add_argument("--width", type=int, default=64, help="base channel count of the ResNet (64 = standard)")
    model.add_argument("--disable_WS", action="store_true", help="plain convolutions instead of weight-standardised ones")
    model.add_argument("--disable_c_residual", action="store_true", help="no shortcut connections in the client's blocks")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--num_epoch", type=int, default=200, help="training epochs (one epoch: every sample seen about once)")
    optim.add_argument("--max_steps", type=int, default=0, help="stop after this many training steps in total (0 = no limit)")
    optim.add_argument("--lr", type=float, default=0.06, help="server learning rate")
    optim.add_argument("--c_lr", type=float, default=-1.0, help="client learning rate (-1 = same as --lr)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight_decay", type=float, default=5e-4, help="SGD weight decay")
    optim.add_argument("--cos", action="store_true", help="cosine learning-rate decay over the epochs (else MultiStepLR)")
    optim.add_argument("--milestones", type=int, nargs="*", default=[], help="MultiStepLR epochs at which the lr is multiplied by the gamma")
    optim.add_argument("--s_gamma", type=float, default=0.1, help="server MultiStepLR factor")
    optim.add_argument("--c_gamma", type=float, default=0.1, help="client MultiStepLR factor")
    optim.add_argument("--use_fp16", action="store_true", help="mixed precision (CUDA only; full precision with a warning on CPU)")
    optim.add_argument("--amp_dtype", type=str, default="fp16", choices=["fp16", "bf16"], help="mixed-precision type with --use_fp16")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_freq", type=int, default=1, help="kNN monitor every this many epochs (0 = only at the end)")
    evaluation.add_argument("--knn_k", type=int, default=200, help="neighbours of the kNN monitor")
    evaluation.add_argument("--knn_t", type=float, default=0.1, help="temperature of the kNN monitor")
    evaluation.add_argument("--eval_batch_size", type=int, default=512, help="batch size of feature extraction")
    evaluation.add_argument("--linear_epochs", type=int, default=100, help="epochs of the final linear and semi-supervised probes")
    evaluation.add_argument("--skip_linear", action="store_true", help="skip the final linear and semi-supervised probes")

    method_cls.add_arguments(parser)
    return parser


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML preset; every key must be an option of this entry script."""
    config_path = Path(path)
    if not config_path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        values = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must map option names to values")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r} in config file {path} (see --help for the option names)")
    return values


def parse_args(method: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse defaults <- --config YAML <- command line, validate, and fill derived values."""
    parser = build_parser(method)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config_file(known.config, parser))
    args = parser.parse_args(argv)
    args.method = method
    return finalize_args(args)


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check contradictions (one clear line each) and fill the derived values."""
    args.partition = resolve_partition_method(args)
    if args.c_lr == -1.0:
        args.c_lr = args.lr
    if args.output_dir is None:
        args.output_dir = os.path.join(
            "outputs", f"{args.method}_{args.dataset}_{args.arch}_cut{args.cutlayer}_client{args.num_client}_seed{args.seed}")
    positive = {"num_client": args.num_client, "batch_size": args.batch_size, "avg_freq": args.avg_freq,
                "num_epoch": args.num_epoch, "width": args.width, "eval_batch_size": args.eval_batch_size}
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")
    if not 0.0 < args.client_sample_ratio <= 1.0:
        raise UserError(f"--client_sample_ratio must be in (0, 1] (got {args.client_sample_ratio})")
    if args.max_steps < 0:
        raise UserError(f"--max_steps must be 0 (no limit) or positive (got {args.max_steps})")
    if args.lr <= 0 or args.c_lr <= 0:
        raise UserError("--lr and --c_lr must be positive")
    if args.eval_only and not args.checkpoint:
        raise UserError("--eval_only needs --checkpoint PATH (a checkpoint_last.pt of an earlier run)")
    if args.hetero:
        parse_hetero_string(args.hetero_string)
    check_cutlayer(args.arch, args.cutlayer)
    method_class(args.method).check_args(args)
    return args


def training_signature(args: argparse.Namespace) -> dict[str, Any]:
    """The options that define what a run computes; a checkpoint resumes only under the same ones."""
    return {key: value for key, value in sorted(vars(args).items()) if key not in RUNTIME_OPTIONS}


def save_resolved_config(args: argparse.Namespace, path: str | os.PathLike) -> None:
    """Write every resolved option as YAML (usable again with --config)."""
    values = {key: value for key, value in sorted(vars(args).items())
              if key not in {"config", "resume", "eval_only", "checkpoint", "method"}}
    write_text_atomic(path, yaml.safe_dump(values, sort_keys=True))
