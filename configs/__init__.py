"""Every command-line option of the entry scripts, YAML presets (--config), and validation.

Option names follow the seed scripts (MocoSFL and its SwAV descendant). The loop's options are here; each
registered method adds its own group (functions.methods.base). `parse_args(method, argv)` returns the resolved
options; values come from, in increasing priority: the defaults here, the `--config` YAML
file, the command line.

Besides the options, the namespace parse_args returns carries where they came from, set by `_record_sources` only
and read through `given_options` and `unused_options` (absent, e.g. in a namespace rebuilt from a checkpoint, both
are empty):
  _given   sorted names of the options the user set, in the config file or on the command line (an option given
           wins over a preset; --eval_only takes those from the command and everything else from the checkpoint);
  _unused  sorted names of the seed's other method's options the user set, which have no effect on this method.
The names start with "_" so that run_options (what a checkpoint and config.yaml keep) leaves them out.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterable, NoReturn, Sequence

import yaml

from functions.core.compat import add_compat_arguments, add_ignored_seed_flags, add_seed_options, unused_seed_options
from functions.core.errors import UserError, check_range
from functions.core.files import check_output_folder, write_text_atomic
from functions.data.datasets import dataset_entry, dataset_names, resolved_entry
from functions.data.partition import add_partition_arguments, parse_hetero_string, resolve_partition_method
from functions.methods.registry import method_class
from functions.net.options import NETWORK_OPTIONS, add_network_arguments, check_network_options
from functions.privacy.defences import RESSFL_DEFENCE, selected_defences
from functions.sfl.fedavg_rules import selected_fedavg_rule
from models.bottleneck import parse_bottleneck_option
from models.decoders import check_decoder_name
from models.split import ARCHITECTURES, check_cutlayer

CONFIG_DIR = Path(__file__).resolve().parent
# --attack_protocol: this project's auxiliary-data attack (the default) or MocoSFL's (functions.attack_mocosfl).
ATTACK_PROTOCOLS = ("auxiliary", "mocosfl")

# Options that do not change what a run computes: a resumed run may change them freely.
RUNTIME_OPTIONS = frozenset({
    "config", "resume", "checkpoint", "eval_only", "output_dir", "data_dir", "device", "num_workers",
    "num_epoch", "max_steps", "eval_freq", "linear_epochs", "skip_linear", "knn_k", "knn_t", "eval_protocol",
    "log_freq", "eval_batch_size", "client_exec", "is_distributed", "compile",
    "attack", "MIA_arch", "aux_data", "aux_images", "attack_epochs", "attack_client", "attack_images",
    "attack_protocol", "attack_data_proportion",
    "channels_last", "cudnn_benchmark",
}) | NETWORK_OPTIONS


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
                          "up to rounding (see docs/speed.md)")
    run.add_argument("--cudnn_benchmark", action="store_true",
                     help="let cuDNN time its convolution algorithms and keep the fastest (CUDA; faster for fixed "
                          "shapes, but runs are no longer bit-reproducible)")
    add_compat_arguments(run)

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
    sfl.add_argument("--cutlayer", type=int, default=1,
                     help="client keeps this many backbone units (ResNet: 1 = stem only, 2 = stem + first block, ...; "
                          "VGG: one per conv; MobileNetV2: stem, each block, last conv)")
    sfl.add_argument("--batch_size", type=int, default=64, help="samples per client per step")
    sfl.add_argument("--client_sample_ratio", type=float, default=1.0, help="fraction of clients in the pool, redrawn each epoch")
    sfl.add_argument("--avg_freq", type=int, default=1, help="FedAvg of client models this many times per epoch")
    sfl.add_argument("--client_exec", type=str, default="auto", choices=["auto", "vmap", "loop"],
                     help="client simulation: the whole pool in one vectorised pass over stacked per-client weights, "
                          "or a Python loop over per-client models (same results); auto: the faster one for the "
                          "device and client part by the benchmark's rule (vmap on GPUs; on CPUs the loop for client "
                          "parts of 64+ channels with 8+ images per client)")
    sfl.add_argument("--hetero", action="store_true",
                     help="heterogeneous clients: each client's batch is proportional to its data size (rich clients send more rows)")
    sfl.add_argument("--hetero_string", type=str, default="0.2_0.8|16|0.8_0.2",
                     help="with --hetero and --partition iid: 'A_B|C|D_E' = a fraction A of clients holds a fraction B of the "
                          "data (the others, D, hold E); C is the rich clients' batch multiplier")
    sfl.add_argument("--auto_adjust", action="store_true",
                     help="MocoSFL's recommended settings for the number of clients: --batch_size 100 // num_client "
                          "(1 beyond 50 clients), --avg_freq 1000 // (batch_size * num_client), --client_sample_ratio "
                          "1 / (num_client // 100) from 200 clients; an option given explicitly wins")
    sfl.add_argument("--loss_threshold", type=float, default=0.0,
                     help="MocoSFL's communication saving (0 = off): after 10 epochs, when the epoch loss fell by less "
                          "than this, the clients stop receiving gradients (one epoch), then stop sending smashed data "
                          "too and the server replays the last sent ones, until the loss falls faster again")
    sfl.add_argument("--divergence_measure", action="store_true",
                     help="log each epoch the divergence of the pool's client models from their average")
    sfl.add_argument("--divergence_aware", action="store_true",
                     help="divergence-aware FedAvg (FedEMA, as MocoSFL means it): each pool client keeps mu * its own "
                          "weights + (1 - mu) * the average, mu = min(lambda * divergence, 1), the divergence summed "
                          "over its layers")
    sfl.add_argument("--fedavg_rule", type=str, default=None, metavar="NAME",
                     help="what the clients load after FedAvg, a registered rule: fedavg (the data-size-weighted "
                          "average, the default) or divergence_aware (what --divergence_aware selects)")
    sfl.add_argument("--div_lambda", type=float, default=1.0,
                     help="lambda of --divergence_aware at the first FedAvg; from then on each client's lambda is "
                          "scaled so that its first mu is kept (FedEMA's auto-scaler)")
    sfl.add_argument("--scheme", type=str, default="sfl", choices=["sfl", "fl"],
                     help="sfl: split federated learning; fl: MocoSFL's FL-MoCo baseline (each client trains the whole "
                          "network with its own queue, --local_epoch, then FedAvg)")
    sfl.add_argument("--local_epoch", type=int, default=5,
                     help="--scheme fl: passes over its data each client makes per epoch")
    add_partition_arguments(parser)
    add_network_arguments(parser.add_argument_group("real clients over the network (docs/devices.md)"))

    model = parser.add_argument_group("model")
    model.add_argument("--arch", type=str, default="ResNet18",
                       help=f"split backbone: {', '.join(entry.name for entry in ARCHITECTURES.values())}")
    model.add_argument("--width", type=int, default=64, help="base channel count of the backbone (64 = standard)")
    model.add_argument("--disable_WS", action="store_true", help="plain convolutions instead of weight-standardised ones")
    model.add_argument("--disable_c_residual", action="store_true", help="no shortcut connections in the client's blocks")

    data.add_argument("--num_class", type=int, default=None,
                      help="classes of the dataset (MocoSFL's option; taken from --dataset, a different value is refused)")
    data.add_argument("--data_size", type=int, default=None,
                      help="image side in pixels (MocoSFL's option; taken from --dataset, a different value is refused)")
    add_ignored_seed_flags(data, run)

    privacy = parser.add_argument_group(
        "privacy (model-inversion attack, the ResSFL defence, the bottleneck and expert initialisation)")
    privacy.add_argument("--attack", action="store_true",
                         help="model-inversion attack on the smashed data after training (and with --eval_only)")
    privacy.add_argument("--MIA_arch", type=str, default="custom",
                         help="ResSFL's simulated attacker (and the auxiliary protocol's decoder): custom, "
                              "conv_normN<N>C<C> or res_normN<N>C<C> (the auxiliary attack reads custom as "
                              "res_normN4C64)")
    privacy.add_argument("--attack_protocol", type=str, default="auxiliary", choices=ATTACK_PROTOCOLS,
                         help="auxiliary: the decoder learns from --aux_data; mocosfl: MocoSFL's attack (1 %% of the "
                              "run's training images, JPEG round trip, best of a 90/10 split, res_normN4C64)")
    privacy.add_argument("--attack_data_proportion", type=float, default=0.01,
                         help="--attack_protocol mocosfl: the share of the run's training images the attacker gets")
    privacy.add_argument("--aux_data", type=str, default="cifar100",
                         help="the attacker's images: a dataset read from --data_dir, or heldout (the run's test images)")
    privacy.add_argument("--aux_images", type=int, default=10000, help="at most this many auxiliary images")
    privacy.add_argument("--attack_epochs", type=int, default=50, help="epochs of the attacker's decoder training")
    privacy.add_argument("--attack_client", type=int, default=0, help="the client whose images are attacked")
    privacy.add_argument("--attack_images", type=int, default=128, help="target images rebuilt and scored")
    privacy.add_argument("--defence", type=str, nargs="+", default=None, metavar="NAME",
                         help="privacy defences of the smashed data, registered names (ressfl: what --enable_ressfl "
                              "selects); none by default")
    privacy.add_argument("--enable_ressfl", action="store_true", help="ResSFL: attacker-aware training of the clients")
    privacy.add_argument("--ressfl_alpha", type=float, default=0.0, help="ResSFL strength (0 = off)")
    privacy.add_argument("--ressfl_target_ssim", type=float, default=0.5, help="ResSFL: SSIM the attacker should not exceed")
    privacy.add_argument("--adds_bottleneck", action="store_true", help="a bottleneck layer pair at the cut")
    privacy.add_argument("--bottleneck_option", type=str, default="None", help="bottleneck code such as C4S2 (None = off)")
    privacy.add_argument("--initialze_path", type=str, default="None", help="start from an expert run's folder (None = off)")
    privacy.add_argument("--load_server", action="store_true", help="with --initialze_path: load the server part too")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--num_epoch", type=int, default=200, help="training epochs (one epoch: every sample seen about once)")
    optim.add_argument("--max_steps", type=int, default=0, help="stop after this many training steps in total (0 = no limit)")
    optim.add_argument("--lr", "--base_s_lr", type=float, default=0.06,
                       help="server learning rate (--base_s_lr: the seed's name for it)")
    optim.add_argument("--c_lr", "--base_c_lr", type=float, default=-1.0,
                       help="client learning rate, -1 = same as --lr, 0 = frozen client parts (--base_c_lr: the seed's name for it)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight_decay", type=float, default=5e-4, help="SGD weight decay")
    optim.add_argument("--cos", action=argparse.BooleanOptionalAction, default=None,
                       help="cosine learning-rate decay over the epochs, else MultiStepLR (default: off, or the "
                            "--moco_version's)")
    optim.add_argument("--milestones", type=int, nargs="*", default=None,
                       help="MultiStepLR epochs at which the lr is multiplied by the gamma (default: MocoSFL's, 60 %% "
                            "and 80 %% of --num_epoch, for MoCo; none for SwAV; --milestones alone: none)")
    optim.add_argument("--s_gamma", type=float, default=0.1, help="server MultiStepLR factor")
    optim.add_argument("--c_gamma", type=float, default=None,
                       help="client MultiStepLR factor (default: MocoSFL's 0.2 for MoCo, 0.1 for SwAV)")
    optim.add_argument("--use_fp16", action="store_true", help="mixed precision (CUDA only; full precision with a warning on CPU)")
    optim.add_argument("--amp_dtype", type=str, default="fp16", choices=["fp16", "bf16"], help="mixed-precision type with --use_fp16")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_freq", type=int, default=1, help="kNN monitor every this many epochs (0 = only at the end)")
    evaluation.add_argument("--knn_k", type=int, default=200, help="neighbours of the kNN monitor")
    evaluation.add_argument("--knn_t", type=float, default=0.1, help="temperature of the kNN monitor")
    evaluation.add_argument("--eval_batch_size", type=int, default=512, help="batch size of feature extraction")
    evaluation.add_argument("--linear_epochs", type=int, default=100, help="epochs of the final linear and semi-supervised probes")
    evaluation.add_argument("--skip_linear", action="store_true", help="skip the final linear and semi-supervised probes")
    evaluation.add_argument("--eval_protocol", type=str, default="honest", choices=["honest", "mocosfl"],
                            help="honest: probes on the last model, scored once after their last epoch; mocosfl: "
                                 "MocoSFL's Adam linear probe and MLP heads on 10 %% and 1 %% of the labels, on "
                                 "checkpoint_best.pt (best kNN), each reporting its best test epoch (figures selected "
                                 "on the test set, labelled _test_selected)")

    method_cls.add_arguments(parser)
    add_seed_options(parser)
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
    check_option_values(values, parser, f"config file {path}")
    return values


def check_option_values(values: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> None:
    """Every key of `values` (from `source`, e.g. "config file X") an option of the parser, every value of its type."""
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    unknown = sorted(str(key) for key in set(values) - set(actions))
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r} in {source} (see --help for the option names)")
    for key, value in values.items():
        problem = _config_value_problem(actions[key], value)
        if problem:
            raise UserError(f"{source}: {key} {problem}, got {value!r}")


def _config_value_problem(action: argparse.Action, value: Any) -> str | None:
    """What is wrong with `value` for the option of `action` ("must be ..."), or None when it fits."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        return None if isinstance(value, bool) or (value is None and action.default is None) else "must be true or false"
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


def saved_options_problem(saved: dict[str, Any], method: str) -> str | None:
    """What is wrong with the options a checkpoint saved (a value its option cannot take: its type, its choices,
    its range), or None; options this version does not know are left to the checks that read them."""
    actions = {action.dest: action for action in build_parser(method)._actions if action.dest not in ("help", "config")}
    for key, value in saved.items():
        problem = _config_value_problem(actions[key], value) if key in actions else None
        if problem:
            return f"its option {key} {problem}, got {value!r}"
    for name, interval in _RANGES.items():
        if saved.get(name) is not None:
            try:
                check_range(name, saved[name], interval)
            except UserError as error:
                return f"its option {error}"
    return None


def parse_args(method: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse defaults <- --config YAML <- command line, validate, and fill derived values (and where they came from:
    given_options, unused_options)."""
    parser = build_parser(method)
    pre = OptionParser(add_help=False, prog=parser.prog)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    config = load_config_file(known.config, parser) if known.config else {}
    return parse_args_with_config(method, parser, config, argv)


def parse_args_with_config(method: str, parser: argparse.ArgumentParser, config: dict[str, Any],
                           argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args once the config file's values are read (and checked): they are the defaults of the command line."""
    parser.set_defaults(**config)
    args = parser.parse_args(argv)
    given = set(config) | set(vars(_given_on_command_line(parser, argv)))
    args.method = method
    _record_sources(args, given, unused_seed_options(args, parser, given))
    try:
        return finalize_args(args)
    except UserError as error:
        raise UserError(str(error), on_every_rank=True) from None


def _record_sources(args: argparse.Namespace, given: Iterable[str], unused: Iterable[str]) -> None:
    """Keep on `args` the options the user set and those of the other method among them (see the module's
    docstring)."""
    args._given = sorted(given)
    args._unused = sorted(unused)


def given_options(args: argparse.Namespace) -> frozenset[str]:
    """The options the user set (config file or command line); none for a namespace parse_args did not make."""
    return frozenset(getattr(args, "_given", ()))


def unused_options(args: argparse.Namespace) -> list[str]:
    """The seed's other method's options the user set, which have no effect on this run."""
    return list(getattr(args, "_unused", ()))


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
    args.partition = resolve_partition_method(args.partition, dirichlet=args.dirichlet, noniid_ratio=args.noniid_ratio)
    if args.c_lr == -1.0:
        args.c_lr = args.lr
    if isinstance(args.output_dir, str):
        check_output_folder("--output_dir", args.output_dir, "the run")
    if args.output_dir is None:
        args.output_dir = os.path.join(
            "outputs", f"{args.method}_{args.dataset}_{args.arch}_cut{args.cutlayer}_client{args.num_client}_seed{args.seed}")
    _check_ranges(args)  # before --auto_adjust, which divides by --num_client and --batch_size
    apply_auto_adjust(args)  # whose values lie inside the ranges
    selected_fedavg_rule(args.fedavg_rule, args.divergence_aware)
    check_privacy_options(args)
    check_dataset_options(args)
    for name in ("output_dir", "data_dir", "config", "checkpoint"):
        value = getattr(args, name)
        if isinstance(value, str) and not _is_utf8(value):
            raise UserError(f"--{name} {value!r} is not a valid UTF-8 path; choose a folder whose name is UTF-8")
    if args.eval_only and not args.checkpoint:
        raise UserError("--eval_only needs --checkpoint PATH (a checkpoint_last.pt of an earlier run)")
    if args.eval_protocol == "mocosfl" and args.eval_freq == 0 and not args.eval_only:
        raise UserError("--eval_protocol mocosfl evaluates the epoch with the best kNN accuracy: it needs the kNN "
                        "monitor (--eval_freq 1, as MocoSFL runs it)")
    if args.hetero:
        parse_hetero_string(args.hetero_string)
    check_cutlayer(args.arch, args.cutlayer)
    method_class(args.method).check_args(args)
    check_network_options(args)
    if args.cos is None:
        args.cos = False
    return args


# The interval each numeric option of the loop must lie in ("[" and "]" include the bound, "(" and ")" do not).
# 16 times the standard network's 64 channels: a ResNet-18 of about 2.9 billion weights, already beyond what a run of
# split learning trains; a wider --width only ends later, in the allocator.
MAX_WIDTH = 1024
# A hundred times MocoSFL's largest setting (1000 clients): every client keeps its own part of the network, momentum
# copy and optimizer state in memory, so a far larger count only ends in the allocator.
MAX_CLIENTS = 100_000
_RANGES = {
    "num_client": f"[1, {MAX_CLIENTS}]", "batch_size": "[1, inf)", "avg_freq": "[1, inf)", "num_epoch": "[1, inf)",
    "width": f"[1, {MAX_WIDTH}]", "eval_batch_size": "[1, inf)", "max_steps": "[0, inf)", "num_workers": "[0, inf)",
    "log_freq": "[1, inf)", "eval_freq": "[0, inf)", "knn_k": "[1, inf)", "knn_t": "(0, inf)",
    "linear_epochs": "[1, inf)", "seed": f"[0, {2**63 - 1}]", "lr": "(0, inf)", "c_lr": "[0, inf)",
    "momentum": "[0, 1)", "weight_decay": "[0, inf)", "s_gamma": "(0, inf)", "c_gamma": "(0, inf)",
    "client_sample_ratio": "(0, 1]", "data_proportion": "(0, 1]", "dirichlet_alpha": "(0, inf)",
    "min_client_samples": "[1, inf)", "aux_images": "[2, inf)", "attack_epochs": "[1, inf)",
    "attack_images": "[1, inf)", "attack_client": "[0, inf)", "attack_data_proportion": "(0, 1]",
    # A negative ResSFL strength would reward leakage; SSIM lies in [-1, 1].
    "ressfl_alpha": "[0, inf)", "ressfl_target_ssim": "[-1, 1]", "div_lambda": "(0, inf)",
    "loss_threshold": "[0, inf)", "local_epoch": "[1, inf)", "data_size": "[1, inf)",
}


def _check_ranges(args: argparse.Namespace) -> None:
    """Every numeric option of the loop inside its interval: one line naming the option otherwise."""
    for name, interval in _RANGES.items():
        if getattr(args, name) is not None:  # None: a default the schedule resolves (--c_gamma)
            check_range(name, getattr(args, name), interval)
    if any(milestone < 1 for milestone in args.milestones or ()):
        raise UserError(f"--milestones are epochs, each at least 1 (got {args.milestones})")


def apply_auto_adjust(args: argparse.Namespace) -> None:
    """--auto_adjust: MocoSFL's batch size, FedAvg frequency and client sampling for the number of clients; options
    the user gave keep their value."""
    if not args.auto_adjust:
        return
    given, clients = given_options(args), args.num_client
    adjusted = {"batch_size": 100 // clients if clients <= 50 else 1}
    batch_size = args.batch_size if "batch_size" in given else adjusted["batch_size"]
    if clients <= 1000:
        adjusted["avg_freq"] = max(1, 1000 // (batch_size * clients))
    adjusted["client_sample_ratio"] = 1 / (clients // 100) if clients >= 200 else 1.0
    for name, value in adjusted.items():
        if name not in given:
            setattr(args, name, value)


def check_privacy_options(args: argparse.Namespace) -> None:
    """The bottleneck, expert initialisation, defence and ResSFL options: their combinations, one clear line each.

    As in MocoSFL, a --bottleneck_option other than None adds the bottleneck (and sets --adds_bottleneck);
    --adds_bottleneck alone names no bottleneck and is refused rather than ignored.
    """
    if args.bottleneck_option != "None":
        parse_bottleneck_option(args.bottleneck_option)
        args.adds_bottleneck = True
    elif args.adds_bottleneck:
        raise UserError("--adds_bottleneck needs --bottleneck_option, e.g. C4S2 (4 channels, stride 2)")
    if args.adds_bottleneck and args.scheme == "fl":
        raise UserError("--bottleneck_option sits at the cut of split learning; --scheme fl has no cut")
    if args.load_server and args.initialze_path == "None":
        raise UserError("--load_server needs --initialze_path (the run whose server part to load)")
    if args.initialze_path != "None" and args.scheme == "fl":
        raise UserError("--initialze_path loads the client (and server) part of a split run; --scheme fl trains "
                        "whole networks on the clients and would ignore it")
    if args.attack and args.scheme == "fl":
        raise UserError("--attack inverts the smashed data a client sends; --scheme fl sends none")
    defences = selected_defences(args.defence, args.enable_ressfl)
    ressfl = RESSFL_DEFENCE in defences
    if args.ressfl_alpha > 0 and not ressfl:
        raise UserError("--ressfl_alpha needs --enable_ressfl or --defence ressfl (the simulated attacker it "
                        "penalises)")
    if args.enable_ressfl and args.scheme == "fl":
        raise UserError("--enable_ressfl defends smashed data; --scheme fl sends none")
    if defences and args.scheme == "fl":
        raise UserError(f"--defence {' '.join(defences)} defends smashed data; --scheme fl sends none")
    if ressfl or (args.attack and args.attack_protocol == "auxiliary"):
        check_decoder_name(args.MIA_arch)
    if args.attack:
        if args.attack_client >= args.num_client:
            raise UserError(f"--attack_client {args.attack_client} is not a client of this run "
                            f"(0..{args.num_client - 1})")
        if args.attack_protocol == "auxiliary" and args.aux_data != "heldout":
            dataset_entry(args.aux_data)  # an unknown name stops the run now, not after training


def check_dataset_options(args: argparse.Namespace) -> None:
    """MocoSFL's --num_class and --data_size follow the dataset; a value that contradicts it is refused."""
    entry = resolved_entry(args.dataset, args.data_size)
    for name, actual in (("num_class", entry.num_classes), ("data_size", entry.image_size)):
        value = getattr(args, name)
        if name == "num_class" and not actual:
            continue  # an image folder's classes are known once it is read
        if value is not None and value != actual:
            raise UserError(f"--{name} {value} does not match --dataset {args.dataset} ({actual}); drop --{name}")
        setattr(args, name, actual)


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
