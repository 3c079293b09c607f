"""Compatibility with the seed scripts and MocoSFL: --compat, the seed's options that change nothing here, and
the options of the seed's other method.

--compat: MocoSFL's option names mean MocoSFL's behaviour; its bugs are fixed unless --compat mocosfl asks for them.
Where MocoSFL's behaviour is a choice (a head, a view, an initialisation, an order of updates) the default follows
it. Where it is a bug (see docs/mocosfl.md, "Differences"), the default keeps the fix and `--compat mocosfl`
reproduces MocoSFL's code as it ran, so that a published number can be re-run as it was produced.

The seed's command lines run unchanged: its flags that never changed what a run computes are accepted and ignored,
and every entry script accepts the options of the seed's other method (the seed's scripts pass them to both),
saying when one was given that has no effect.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterable

COMPAT_MODES = ("none", "mocosfl")

# Options of the seed's and MocoSFL's shared parser (configs/__init__.py of both) that belong to the other method:
# every entry script accepts them, as the seed's scripts pass them to both, and says when one has no effect here.
SEED_OPTIONS: dict[str, dict[str, Any]] = {
    "moco_version": dict(type=str), "pairloader_option": dict(type=str), "K": dict(type=int),
    "K_dim": dict(type=int), "T": dict(type=float), "symmetric": dict(action="store_true"),
    "mlp": dict(action="store_true"), "aug_plus": dict(action="store_true"), "CLR_option": dict(type=str),
    "loss_type": dict(type=str), "disable_feature_sharing": dict(action="store_true"),
    "nmb_crops": dict(type=int, nargs="+"), "size_crops": dict(type=int, nargs="+"),
    "min_scale_crops": dict(type=float, nargs="+"), "max_scale_crops": dict(type=float, nargs="+"),
    "crops_for_assign": dict(type=int, nargs="+"), "aug_type": dict(type=str), "temperature": dict(type=float),
    "epsilon": dict(type=float), "sinkhorn_iterations": dict(type=int), "feat_dim": dict(type=int),
    "nmb_prototypes": dict(type=int), "queue_length": dict(type=int), "epoch_queue_starts": dict(type=int),
    "freeze_prototypes_niters": dict(type=int), "use_swav_scheduler": dict(action="store_true"),
    "warmup_epochs": dict(type=int), "final_s_lr": dict(type=float), "final_c_lr": dict(type=float),
    "start_warmup": dict(type=float),
}
# The title of the group of the other method's options (hidden from --help).
OTHER_METHOD_GROUP = "options of the seed's other method (accepted, no effect on this one)"


def add_compat_arguments(run: argparse._ArgumentGroup) -> None:
    """--compat, and the seed's --is_distributed (torchrun's environment decides instead)."""
    run.add_argument("--compat", type=str, default="none", choices=list(COMPAT_MODES),
                     help="none: MocoSFL's option names with MocoSFL's choices and its bugs fixed; mocosfl: reproduce "
                          "MocoSFL's code as it ran, bugs included (client lr stepped per client step, its "
                          "divergence-aware FedAvg, its communication-saving count, ...), to re-run a published "
                          "number; for SwAV, the seed fork's (SL-FedSwAV) per-client loss summed with its running "
                          "per-client sum never reset, and client gradients from the global crops only; every "
                          "difference is listed in docs/mocosfl.md")
    run.add_argument("--is_distributed", action="store_true",
                     help="accepted for compatibility with the seed scripts; torchrun's environment decides")


def add_ignored_seed_flags(data: argparse._ArgumentGroup, run: argparse._ArgumentGroup) -> None:
    """The seed's --augmentation_option and --debug: accepted, and like in the seed they change nothing."""
    data.add_argument("--augmentation_option", action="store_true",
                      help="MocoSFL's augmentation switch for supervised training; self-supervised views are always "
                           "augmented, so it changes nothing here (as in MocoSFL)")
    run.add_argument("--debug", action="store_true", help="accepted as in MocoSFL and the seed, which never read it")


def add_seed_options(parser: argparse.ArgumentParser) -> None:
    """Accept the seed's options that this entry script's method does not define (they change nothing here)."""
    defined = {action.dest for action in parser._actions}
    missing = [name for name in SEED_OPTIONS if name not in defined]
    if not missing:
        return
    group = parser.add_argument_group(OTHER_METHOD_GROUP)
    for name in missing:
        group.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS, **SEED_OPTIONS[name])


def unused_seed_options(args: argparse.Namespace, parser: argparse.ArgumentParser, given: Iterable[str]) -> list[str]:
    """The options of the other method that this run was given (`given`: the options the user set), to say that
    they have no effect."""
    accepted = {action.dest for group in parser._action_groups if group.title == OTHER_METHOD_GROUP
                for action in group._group_actions}
    return sorted(name for name in accepted & set(given) if getattr(args, name) not in (None, False))


def mocosfl_compat(args: argparse.Namespace) -> bool:
    """Whether the run reproduces MocoSFL's bugs (--compat mocosfl); runs saved before the option have none."""
    return getattr(args, "compat", "none") == "mocosfl"
