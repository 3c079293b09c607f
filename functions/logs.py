"""What a run reports: output.log and stdout, the progress bar (or plain progress lines), metrics.json, tensorboard."""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from functions.distributed import run_agreed
from functions.files import write_text_atomic

logger = logging.getLogger("sfl")


def setup_logging(output_dir: Path, is_main: bool) -> None:
    """Log to output.log in the run folder and to stdout (main process only)."""
    logger.handlers.clear()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(output_dir / "output.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)


@dataclass
class LogWindow:
    """The steps since the last log point: their losses (still on the device), images and learning rates."""

    losses: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    images: int = 0
    start: float = field(default_factory=time.perf_counter)
    server_lr: float = 0.0
    client_lr: float = 0.0


class MetricsLog:
    """metrics.json of a run: lists of [step or epoch, value] and the final results, written atomically."""

    def __init__(self, path: Path, enabled: bool = True, **header: Any) -> None:
        self.path = path
        self.enabled = enabled  # only the main process writes; the others keep the same values in memory
        self.data: dict[str, Any] = {**header, "train_loss": [], "knn_acc": [], "final": {}}

    def append(self, key: str, index: int, value: float) -> None:
        self.data.setdefault(key, []).append([index, value])

    def save(self) -> None:
        """Write metrics.json (main process). Every rank calls it, so a failed write stops all ranks together."""
        run_agreed(lambda: write_text_atomic(self.path, json.dumps(self.data, indent=1)) if self.enabled else None)


class TensorboardLog:
    """tensorboard scalars of the main process; a failed write (a full disk) turns it off with one warning.

    Training goes on: the next checkpoint write then stops the run with its own clear line if the disk is still full.
    """

    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.folder = folder
        self.enabled = enabled
        self._writer: Any = None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if not self.enabled:
            return
        try:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                _quiet_tensorboard_thread_errors()
                self._writer = SummaryWriter(str(self.folder))
            self._writer.add_scalar(tag, value, step)
        except OSError as error:
            self._turn_off(error)

    def close(self) -> None:
        """Flush and close the writer (safe to call twice)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except OSError as error:
            self._turn_off(error)

    def _turn_off(self, error: OSError) -> None:
        logger.warning(f"tensorboard logging stopped: cannot write {self.folder} ({error.strerror or error}); "
                       "training goes on")
        self.enabled = False
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass  # the same failure again; already reported


def _quiet_tensorboard_thread_errors() -> None:
    """Keep tensorboard's writer thread from printing a traceback for a write error it hands to the main thread."""
    if getattr(threading.excepthook, "quiets_tensorboard", False):
        return
    previous = threading.excepthook

    def hook(arguments: Any) -> None:
        if isinstance(arguments.exc_value, OSError) and type(arguments.thread).__module__.startswith("tensorboard."):
            return  # TensorboardLog reports it as one warning
        previous(arguments)

    hook.quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class ProgressBar:
    """The epoch's progress: a tqdm bar on a terminal; redirected to a file (Slurm, nohup) the bar's carriage returns
    would garble the log, so `report` prints one plain line per log point instead."""

    def __init__(self, total: int, initial: int, description: str, enabled: bool) -> None:
        from tqdm import tqdm

        self.enabled = enabled
        self.description = description
        self.bar = tqdm(total=total, initial=initial, desc=description, disable=not (enabled and sys.stdout.isatty()),
                        dynamic_ncols=True, leave=False, file=sys.stdout)

    def update(self) -> None:
        """One more step done."""
        self.bar.update(1)

    def report(self, position: str, loss: float, lr: float, images_per_sec: float) -> None:
        """Show the latest loss, learning rate and speed."""
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{images_per_sec:.0f}")
        if self.bar.disable and self.enabled:
            print(f"{position}: loss {loss:.4f}, lr {lr:.4g}, {images_per_sec:.0f} img/s", flush=True)

    def close(self) -> None:
        self.bar.close()
