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
from typing import Any, NoReturn, Sequence

import yaml

from functions.datasets import dataset_names
from functions.errors import UserError, check_range
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


class OptionParser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported as one UserError line (every rank of a torchrun
    makes the same mistake, so one process per node prints it)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)", on_every_rank=True)


def build_parser(method: str) -> argparse.ArgumentParser:
    """The parser of the entry script of a registered method: the loop's options, then the method's own."""
    method_cls = method_class(method)
    parser = OptionParser(
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
    """Read a YAML preset; every key must be an option of this entry script, every value of that option's type."""
    config_path = Path(path)
    if not config_path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        values = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not a text file (YAML of option: value lines expected)") from None
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must map option names to values")
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    unknown = sorted(str(key) for key in set(values) - set(actions))
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r} in config file {path} (see --help for the option names)")
    for key, value in values.items():
        problem = _config_value_problem(actions[key], value)
        if problem:
            raise UserError(f"config file {path}: {key} {problem}, got {value!r}")
    return values


def _config_value_problem(action: argparse.Action, value: Any) -> str | None:
    """What is wrong with `value` for the option of `action` ("must be ..."), or None when it fits."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return None if isinstance(value, bool) else "must be true or false"
    if value is None:
        return None if action.default is None else "needs a value"
    if action.nargs in ("*", "+"):
        if not isinstance(value, list) or (action.nargs == "+" and not value):
            return "must be a list" + (" of at least one value" if action.nargs == "+" else "")
        problems = [_scalar_problem(action, item) for item in value]
        return next((f"{problem} (each item)" for problem in problems if problem), None)
    return _scalar_problem(action, value)


def _scalar_problem(action: argparse.Action, value: Any) -> str | None:
    """What is wrong with one value of an option of type int, float or str (and its choices), or None."""
    kind = action.type or str
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return "must be a whole number"
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "must be a number"
    if kind is str and not isinstance(value, str):
        return "must be a string"
    if action.choices is not None and value not in action.choices:
        return f"must be one of {', '.join(map(str, action.choices))}"
    return None


def parse_args(method: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse defaults <- --config YAML <- command line, validate, and fill derived values.

    `args._given` holds the options the user set (in the config file or on the command line); --eval_only takes
    those from the command, and everything else from the checkpoint.
    """
    parser = build_parser(method)
    pre = OptionParser(add_help=False, prog=parser.prog)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    config = load_config_file(known.config, parser) if known.config else {}
    parser.set_defaults(**config)
    args = parser.parse_args(argv)
    given = set(config) | set(vars(_given_on_command_line(parser, argv)))
    args.method = method
    args._given = sorted(given)
    try:
        return finalize_args(args)
    except UserError as error:
        raise UserError(str(error), on_every_rank=True) from None


def _given_on_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The options the command line itself sets (parsed again with every default suppressed)."""
    defaults = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return parser.parse_args(argv)
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check contradictions (one clear line each) and fill the derived values."""
    args.partition = resolve_partition_method(args)
    if args.c_lr == -1.0:
        args.c_lr = args.lr
    if args.output_dir is None:
        args.output_dir = os.path.join(
            "outputs", f"{args.method}_{args.dataset}_{args.arch}_cut{args.cutlayer}_client{args.num_client}_seed{args.seed}")
    _check_ranges(args)
    for name in ("output_dir", "data_dir", "config", "checkpoint"):
        value = getattr(args, name)
        if isinstance(value, str) and not _is_utf8(value):
            raise UserError(f"--{name} {value!r} is not a valid UTF-8 path; choose a folder whose name is UTF-8")
    if args.eval_only and not args.checkpoint:
        raise UserError("--eval_only needs --checkpoint PATH (a checkpoint_last.pt of an earlier run)")
    if args.hetero:
        parse_hetero_string(args.hetero_string)
    check_cutlayer(args.arch, args.cutlayer)
    method_class(args.method).check_args(args)
    return args


# The interval each numeric option of the loop must lie in ("[" and "]" include the bound, "(" and ")" do not).
_RANGES = {
    "num_client": "[1, inf)", "batch_size": "[1, inf)", "avg_freq": "[1, inf)", "num_epoch": "[1, inf)",
    "width": "[1, inf)", "eval_batch_size": "[1, inf)", "max_steps": "[0, inf)", "num_workers": "[0, inf)",
    "log_freq": "[1, inf)", "eval_freq": "[0, inf)", "knn_k": "[1, inf)", "knn_t": "(0, inf)",
    "linear_epochs": "[1, inf)", "seed": f"[0, {2**63 - 1}]", "lr": "(0, inf)", "c_lr": "(0, inf)",
    "momentum": "[0, 1)", "weight_decay": "[0, inf)", "s_gamma": "(0, inf)", "c_gamma": "(0, inf)",
    "client_sample_ratio": "(0, 1]", "data_proportion": "(0, 1]", "dirichlet_alpha": "(0, inf)",
    "min_client_samples": "[1, inf)",
}


def _check_ranges(args: argparse.Namespace) -> None:
    """Every numeric option of the loop inside its interval: one line naming the option otherwise."""
    for name, interval in _RANGES.items():
        check_range(name, getattr(args, name), interval)
    if any(milestone < 1 for milestone in args.milestones):
        raise UserError(f"--milestones are epochs, each at least 1 (got {args.milestones})")


def _is_utf8(text: str) -> bool:
    """Whether `text` (e.g. a path from the command line) is valid UTF-8, not undecodable bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """Every resolved option of a run (what a checkpoint keeps), without the bookkeeping of parse_args."""
    return {key: value for key, value in vars(args).items() if not key.startswith("_")}


def training_signature(args: argparse.Namespace) -> dict[str, Any]:
    """The options that define what a run computes; a checkpoint resumes only under the same ones."""
    return {key: value for key, value in sorted(run_options(args).items()) if key not in RUNTIME_OPTIONS}


def save_resolved_config(args: argparse.Namespace, path: str | os.PathLike) -> None:
    """Write every resolved option as YAML (usable again with --config)."""
    values = {key: value for key, value in sorted(run_options(args).items())
              if key not in {"config", "resume", "eval_only", "checkpoint", "method"}}
    write_text_atomic(path, yaml.safe_dump(values, sort_keys=True))
