"""User-facing errors: one clear line and exit code 2, never a traceback; interrupted runs exit 128 + signal."""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Callable, NoReturn

USER_ERROR_EXIT_CODE = 2
# A torchrun rank that leaves the printing of a shared error to its node's first rank waits this long before it
# exits: torchrun ends every rank as soon as one exits, which could otherwise end the first before it printed.
QUIET_RANK_EXIT_DELAY_S = 10.0


class UserError(Exception):
    """An error the user can fix (bad option, missing data); its message is one line that says what to do.

    on_every_rank: every process of a torchrun meets the same error at the same point (a bad option, an error all
    ranks agreed on), so only the first process of each node prints it.
    """

    def __init__(self, message: str, on_every_rank: bool = False) -> None:
        super().__init__(message)
        self.on_every_rank = on_every_rank


def check_range(option: str, value: float, interval: str) -> None:
    """UserError unless `value` is finite and inside an interval written like "[0, 1)" or "(0, inf)"."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above_low = value >= low if interval[0] == "[" else value > low
    below_high = value <= high if interval[-1] == "]" else value < high
    if not (math.isfinite(value) and above_low and below_high):
        raise UserError(f"--{option} must be in {interval} (got {value})")


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving its checkpoint; the message says how to resume."""

    def __init__(self, message: str, signal_number: int, announce: bool = True) -> None:
        super().__init__(message)
        self.signal_number = signal_number
        self.announce = announce  # False on torchrun's other ranks: rank 0 prints the message

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + the signal number (130, 143)."""
        return 128 + self.signal_number


def exit_with_error(message: str, exit_code: int = USER_ERROR_EXIT_CODE) -> NoReturn:
    """Print `error: message` on stderr and exit with `exit_code`."""
    # One write, newline included: ranks of one torchrun share stderr, and print() would write the two apart.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(exit_code)


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point: a UserError exits 2, an interrupted run 128 + signal, each with one line on stderr."""
    try:
        main()
    except UserError as error:
        if error.on_every_rank and os.environ.get("LOCAL_RANK", "0") != "0":
            time.sleep(QUIET_RANK_EXIT_DELAY_S)  # the node's first rank prints the same line, then torchrun ends us
            raise SystemExit(USER_ERROR_EXIT_CODE) from None
        exit_with_error(str(error))
    except TrainingInterrupted as interrupted:
        if interrupted.announce:
            print(f"interrupted: {interrupted}", file=sys.stderr, flush=True)
        raise SystemExit(interrupted.exit_code) from None
    except KeyboardInterrupt:
        # A second Ctrl-C (or one outside training): stop at once; a checkpoint on disk is always a complete one.
        exit_with_error("interrupted before a checkpoint could be saved; the last complete checkpoint, if any, "
                        "is still in --output_dir", 128 + signal.SIGINT)
