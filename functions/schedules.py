"""Learning rates as a pure function of (epoch, step in epoch): nothing to checkpoint, exact on resume."""
from __future__ import annotations

import argparse
import math


class LearningRateSchedule:
    """Cosine decay per epoch (--cos) or MultiStepLR (--milestones, --s_gamma, --c_gamma), server and clients.

    A method with its own schedule subclasses this (e.g. SwAV's warm-up) and returns it from
    ServerMethod.learning_rate_schedule.
    """

    # Whether the rates change within an epoch: the loop then sets them before every step, else once per epoch.
    per_step = False

    @property
    def depends_on_num_epoch(self) -> bool:
        """Whether --num_epoch shapes the rates (then a resumed run cannot change it without changing the past)."""
        return bool(self.args.cos)

    def __init__(self, args: argparse.Namespace, steps_per_epoch: int) -> None:
        self.args = args
        self.steps_per_epoch = steps_per_epoch

    def rates(self, epoch: int, step: int) -> tuple[float, float]:
        """(server lr, client lr) of step `step` of epoch `epoch` (both 0-based)."""
        args = self.args
        if args.cos:
            factor = 0.5 * (1.0 + math.cos(math.pi * epoch / args.num_epoch))
            return args.lr * factor, args.c_lr * factor
        passed = sum(1 for milestone in args.milestones if epoch >= milestone)
        return args.lr * args.s_gamma ** passed, args.c_lr * args.c_gamma ** passed
