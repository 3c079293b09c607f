"""Stop signals (SIGTERM from a scheduler, Ctrl-C) turned into a request the training loop polls between steps,
and the command that resumes a stopped run."""
from __future__ import annotations

import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Iterable, Iterator, TypeVar

import torch

from functions.core.distributed import all_reduce_max_flag, launcher_prefix
from functions.core.errors import TrainingInterrupted
from functions.core.options import OptionGroup
from functions.methods.registry import method_class

Batch = TypeVar("Batch")

# Under torchrun the ranks agree on a stop inside the kNN monitor after every this many batches: one scalar all-reduce,
# small beside the forward pass of a batch, and a signal is answered within that many batches.
AGREE_EVERY_BATCHES = 4


class WorkCutShort(Exception):
    """A stop signal ended work inside the training loop that is not a step (the kNN monitor); the loop then saves
    and stops as after a step."""


class StopSignal:
    """SIGTERM / SIGINT / SIGUSR2 turned into a request the loop polls between steps; a second SIGINT stops at once.

    SIGUSR2 is Slurm's warning before a time limit or a pre-emption (`--signal=USR2@90`, what submitit asks for): the
    run saves and stops as for SIGTERM, instead of dying of the signal's default action.

    Outside the training loop (loading data, building the model, the final evaluation) there is no step to finish:
    after `outside_training(situation)` a signal stops the run at once with TrainingInterrupted, whose message is
    the signal's name followed by `situation` (what was saved, what to run next).
    """

    HANDLED = (signal.SIGTERM, signal.SIGINT, *((signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ()))

    def __init__(self, announce: bool = True) -> None:
        self.signal_number: int | None = None
        self.announce = announce  # False on torchrun's other ranks: rank 0 prints the message
        self._previous: dict[int, Any] = {}
        self._situation: str | None = None  # None while the loop polls
        self._cut_short = False  # inside the loop, around work that is not a step

    def outside_training(self, situation: str) -> None:
        """From now on a signal stops the run at once, saying `situation` (e.g. "before training started: ...")."""
        self._situation = situation

    @contextmanager
    def polling(self) -> Iterator["StopSignal"]:
        """While the training loop runs: a signal is a request it answers after the current step."""
        situation, self._situation = self._situation, None
        try:
            yield self
        finally:
            self._situation = situation

    @contextmanager
    def cut_short(self) -> Iterator[None]:
        """Around work of the training loop that is not a step (the kNN monitor): a signal ends it at once with
        WorkCutShort instead of waiting for it to finish."""
        self._cut_short = True
        try:
            yield
        finally:
            self._cut_short = False

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.signal_number is not None

    @property
    def name(self) -> str:
        """Name of the signal received (SIGTERM, SIGINT)."""
        return signal.Signals(self.signal_number).name if self.signal_number is not None else ""

    def request(self, signal_number: int) -> None:
        """Ask the loop to stop after the current step (what the handler does; tests may call it directly)."""
        self.signal_number = signal_number

    def _handle(self, signal_number: int, frame: Any) -> None:
        if self._situation is not None:
            self.request(signal_number)
            raise TrainingInterrupted(f"{self.name} received {self._situation}", signal_number, announce=self.announce)
        if self._cut_short and not self.requested:
            self.request(signal_number)
            self._cut_short = False
            raise WorkCutShort(self.name)
        if self.requested:
            if signal_number == signal.SIGINT:
                # The user insists (a second Ctrl-C): abandon the step; save_atomic removes its temporary file.
                raise KeyboardInterrupt
            # A repeated SIGTERM (or SIGUSR2) changes nothing: torchrun sends it more than once while stopping its
            # workers, and a scheduler that will not wait follows up with SIGKILL anyway.
            return
        self.request(signal_number)
        # A signal sent to the whole process group (Ctrl-C, Slurm) also ends the data-loader workers; torch's
        # SIGCHLD handler would then raise in the middle of the step. The loop fetches no further batch now.
        sigchld = getattr(signal, "SIGCHLD", None)
        if sigchld is not None and sigchld not in self._previous:
            self._previous[sigchld] = signal.signal(sigchld, signal.SIG_DFL)

    def __enter__(self) -> "StopSignal":
        # Handlers can only be installed from the main thread (a loop driven from another thread keeps the defaults).
        if threading.current_thread() is threading.main_thread():
            for number in self.HANDLED:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()


class AgreedStopBatches(Generic[Batch]):
    """A loader that every rank reads alike (the kNN monitor's memory and test sets), read under torchrun: after every
    `every` batches and at its end all ranks agree whether any got a stop signal, and then all leave it together with
    WorkCutShort. A rank cut alone would leave the others waiting in the next collective (the best epoch, the save)."""

    def __init__(self, loader: Iterable[Batch], stop: StopSignal, device: torch.device,
                 every: int = AGREE_EVERY_BATCHES) -> None:
        self.loader, self.stop, self.device, self.every = loader, stop, device, every

    def __iter__(self) -> Iterator[Batch]:
        batches, count = iter(self.loader), 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception:
                # A signal sent to the whole process group also ends this rank's data workers: the agreement below
                # (the next in every rank's sequence) then cuts the monitor on every rank.
                if not self.stop.requested:
                    raise
                break
            yield batch
            count += 1
            if count % self.every == 0:
                self._agree()
        self._agree()

    def _agree(self) -> None:
        """One all-reduce on every rank: WorkCutShort on all of them when any got a stop signal."""
        if all_reduce_max_flag(self.stop.requested, self.device):
            raise WorkCutShort(self.stop.name or "a stop signal (on another rank)")


@dataclass(frozen=True)
class ResumeCommandOptions(OptionGroup):
    """The run options the resume command names."""

    method: str       # whose entry script continues the run
    output_dir: str   # the run folder, whose config.yaml holds every resolved option


def resume_command(options: ResumeCommandOptions) -> str:
    """The command that continues this run: the one that started it plus --resume, or its saved config."""
    script = method_class(options.method).entry_script
    if Path(sys.argv[0]).name == script:
        arguments = [sys.argv[0], *(a for a in sys.argv[1:] if a != "--resume"), "--resume"]
    else:
        # Called from Python (not the entry script): the run folder's config.yaml holds every resolved option.
        arguments = [script, "--config", str(Path(options.output_dir) / "config.yaml"), "--resume"]
    return f"{launcher_prefix()} {shlex.join(arguments)}"
