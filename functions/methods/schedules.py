"""Learning rates as a pure function of (epoch, step in epoch): nothing to checkpoint, exact on resume.

MocoSFL's schedules: --cos decays both sides along half a cosine over the epochs; otherwise MultiStepLR, by
default at 60 % and 80 % of the epochs (MocoSFL's milestones) with a factor 0.1 on the server and 0.2 on the
clients. MocoSFL steps each client's scheduler after every client step instead of every epoch, so its client
rates run through the whole schedule within the first --num_epoch steps (the cosine back up again after them);
the clients follow the epochs here and `--compat mocosfl` reproduces MocoSFL's stepping
(`client_rate_after_steps`).
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

from functions.core.options import ScheduleOptions

MOCOSFL_SERVER_GAMMA = 0.1  # MocoSFL's MultiStepLR factors (functions/sflmoco_functions.py)
MOCOSFL_CLIENT_GAMMA = 0.2


def mocosfl_milestones(num_epoch: int) -> list[int]:
    """MocoSFL's MultiStepLR milestones: 60 % and 80 % of the epochs (rounded down)."""
    return [int(0.6 * num_epoch), int(0.8 * num_epoch)]


def mocosfl_num_epoch(options: ScheduleOptions) -> int:
    """The epochs MocoSFL's schedulers span: with client sampling its configs multiply --num_epoch by
    int(1 / client_sample_ratio), its epochs being that much shorter."""
    if options.client_sample_ratio == 1.0:
        return options.num_epoch
    return options.num_epoch * int(1 / options.client_sample_ratio)


def multistep_factor(position: int, milestones: Sequence[int], gamma: float) -> float:
    """gamma to the number of milestones reached at `position` (a milestone listed twice counts twice)."""
    return gamma ** sum(1 for milestone in milestones if position >= milestone)


class LearningRateSchedule:
    """Cosine decay per epoch (--cos) or MultiStepLR (--milestones, --s_gamma, --c_gamma), server and clients.

    A method with its own schedule subclasses this (e.g. SwAV's warm-up) and returns it from
    ServerMethod.learning_rate_schedule. `mocosfl_defaults`: without --milestones / --c_gamma, MocoSFL's
    milestones and client factor (else none and 0.1, SwAV's seed keeping a constant rate). The rates follow
    `options` (ScheduleOptions); `args` stays for subclasses that read their method's own options.
    """

    # Whether the rates change within an epoch: the loop then sets them before every step, else once per epoch.
    per_step = False

    def __init__(self, args: argparse.Namespace, steps_per_epoch: int, mocosfl_defaults: bool = True) -> None:
        self.args = args
        self.options = ScheduleOptions.from_args(args)
        self.steps_per_epoch = steps_per_epoch
        self.mocosfl_defaults = mocosfl_defaults
        # --compat mocosfl: each client's rate follows its own count of client steps (MocoSFL's FL baseline steps
        # its clients' schedulers once per epoch, so only its split learning has it; SwAV is not MocoSFL's).
        self.per_client_steps = mocosfl_defaults and self.options.mocosfl_compat and self.options.scheme != "fl"
        if self.per_client_steps:
            self.per_step = True

    @property
    def depends_on_num_epoch(self) -> bool:
        """Whether --num_epoch shapes the rates (then a resumed run cannot change it without changing the past)."""
        return self.options.cos or self.options.milestones is None and self.mocosfl_defaults

    @property
    def milestones(self) -> list[int]:
        """The MultiStepLR epochs: --milestones, else MocoSFL's (60 % and 80 % of the epochs, those past epoch 0)."""
        if self.options.milestones is not None:
            return list(self.options.milestones)
        if not self.mocosfl_defaults:
            return []
        return [milestone for milestone in mocosfl_milestones(self.options.num_epoch) if milestone >= 1]

    @property
    def client_gamma(self) -> float:
        """--c_gamma, else MocoSFL's client factor (0.2)."""
        if self.options.c_gamma is not None:
            return self.options.c_gamma
        return MOCOSFL_CLIENT_GAMMA if self.mocosfl_defaults else MOCOSFL_SERVER_GAMMA

    def rates(self, epoch: int, step: int) -> tuple[float, float]:
        """(server lr, client lr) of step `step` of epoch `epoch` (both 0-based)."""
        options = self.options
        if options.cos:
            factor = 0.5 * (1.0 + math.cos(math.pi * epoch / options.num_epoch))
            return options.lr * factor, options.c_lr * factor
        milestones = self.milestones
        return (options.lr * multistep_factor(epoch, milestones, options.s_gamma),
                options.c_lr * multistep_factor(epoch, milestones, self.client_gamma))

    def client_rate_after_steps(self, client_steps: int) -> float:
        """--compat mocosfl: the lr of a client that has taken `client_steps` steps, as MocoSFL's client scheduler
        gives it: the epoch schedule (over MocoSFL's epochs) advanced once per client step, the cosine continuing
        periodically past its end (0 after --num_epoch steps, the full rate again after twice as many)."""
        options, span = self.options, mocosfl_num_epoch(self.options)
        if options.cos:
            return options.c_lr * 0.5 * (1.0 + math.cos(math.pi * client_steps / span))
        # MocoSFL's own milestones, zeros included (its MultiStepLR applies a milestone 0 from the start).
        milestones = options.milestones if options.milestones is not None else mocosfl_milestones(span)
        return options.c_lr * multistep_factor(client_steps, milestones, self.client_gamma)
