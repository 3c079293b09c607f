"""What a run reports: output.log and stdout, the progress bar (or plain progress lines), metrics.json, tensorboard."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from functions.core.distributed import Runtime, all_reduce_sum, run_agreed
from functions.core.errors import UserError
from functions.core.files import open_run_file, write_text_atomic

logger = logging.getLogger("sfl")


def setup_logging(output_dir: Path, is_main: bool) -> None:
    """Log to output.log in the run folder and to stdout (main process only)."""
    logger.handlers.clear()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main:
        # Opened without following a link: output.log may be appended to, never written through a planted link.
        handle = open_run_file(output_dir / "output.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        handlers.append(logging.StreamHandler(os.fdopen(handle, "a", encoding="utf-8")))
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
        """Add [index, value] to the list `key`; a value for the last index again replaces it (a resumed run
        reports that epoch or step anew), so no index appears twice."""
        entries = self.data.setdefault(key, [])
        if entries and entries[-1][0] == index:
            entries[-1] = [index, value]
        else:
            entries.append([index, value])

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
        self._write(lambda writer: writer.add_scalar(tag, value, step))

    def image(self, tag: str, image: Any, step: int) -> None:
        """A (3, H, W) image in [0, 1] (e.g. the attack's originals above their reconstructions)."""
        self._write(lambda writer: writer.add_image(tag, image, step))

    def _write(self, write: Any) -> None:
        if not self.enabled:
            return
        try:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                _quiet_tensorboard_thread_errors()
                self._writer = SummaryWriter(str(self.folder))
            write(self._writer)
        except ImportError as error:
            logger.warning(f"tensorboard logging is off: it cannot be imported here ({error}); pip install tensorboard")
            self.enabled = False
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


class TrainingLog:
    """The numbers of a training run: metrics.json (every rank keeps them, rank 0 writes), tensorboard and the
    log lines; losses reach the host once per log window, never per step."""

    def __init__(self, output_dir: Path, runtime: Runtime, **header: Any) -> None:
        self.runtime = runtime
        self.metrics = MetricsLog(output_dir / "metrics.json", enabled=runtime.is_main, **header)
        self.tensorboard = TensorboardLog(output_dir / "tensorboard", enabled=runtime.is_main)

    def window(self, window: LogWindow, bar: ProgressBar, position: str, global_step: int, *,
               skipped_steps_allowed: bool, last_good: Callable[[], str]) -> None:
        """Check and log the losses of the steps since the last log point (one host transfer).

        A non-finite loss stops the run (UserError naming `last_good`), unless fp16 loss scaling may skip that step.
        """
        images_per_sec = window.images / max(time.perf_counter() - window.start, 1e-9)
        stacked = torch.stack([loss.float() for _, loss in window.losses])
        if self.runtime.is_distributed:
            all_reduce_sum(stacked)  # one collective per log window: the global losses, identical on every rank
        values = stacked.cpu().tolist()
        for (step, _), value in zip(window.losses, values):
            if math.isfinite(value):
                self.metrics.append("train_loss", step, value)
            elif not skipped_steps_allowed:
                raise UserError(f"the loss became {value} at step {step}; stopped without saving that state; "
                                f"{last_good()} (try a lower --lr)")
            # With fp16 loss scaling a non-finite loss means the scaler skipped that update: counted, not fatal.
        window.losses.clear()
        bar.report(position, values[-1], window.server_lr, images_per_sec)
        for name, value in (("loss", values[-1]), ("lr", window.server_lr), ("client_lr", window.client_lr),
                            ("images_per_sec", images_per_sec)):
            self.tensorboard.scalar(f"train/{name}", value, global_step)
        window.start, window.images = time.perf_counter(), 0

    def mean_loss(self, steps: int) -> float:
        """Mean of the last `steps` logged losses (the epoch's)."""
        recent = [loss for _, loss in self.metrics.data["train_loss"][-steps:]] if steps else []
        return float(np.mean(recent)) if recent else float("nan")

    def loss_scale(self, global_step: int, skipped_steps: int, scale: float) -> None:
        """fp16: the count of skipped steps (metrics.json, tensorboard) and the loss scale (tensorboard)."""
        self.metrics.append("skipped_steps", global_step, skipped_steps)
        self.tensorboard.scalar("train/skipped_steps", skipped_steps, global_step)
        self.tensorboard.scalar("train/loss_scale", scale, global_step)

    def epoch(self, epoch: int, global_step: int, server_lr: float, stats: dict[str, float], steps: int,
              skipped_steps: int | None) -> None:
        """The epoch's summary line (mean loss of its `steps` steps) and its statistics, per epoch (1-based)."""
        recent = [loss for _, loss in self.metrics.data["train_loss"][-steps:]] if steps else [float("nan")]
        summary = f"epoch {epoch + 1}: loss {np.mean(recent):.4f}, lr {server_lr:.4g}, step {global_step}"
        if skipped_steps is not None:
            summary += f", skipped_steps {skipped_steps}"
        for name, value in stats.items():
            self.metrics.append(name, epoch + 1, value)
            self.tensorboard.scalar(f"train/{name}", value, epoch + 1)
            summary += f", {name} {value:.4g}"
        logger.info(summary)

    def evaluation(self, key: str, index: int, value: float) -> None:
        """An evaluation figure (e.g. the kNN monitor after epoch `index`): metrics.json, tensorboard, saved now."""
        self.metrics.append(key, index, value)
        self.tensorboard.scalar(f"eval/{key}", value, index)
        self.metrics.save()

    def final(self, results: dict[str, Any], global_step: int) -> None:
        """The final evaluation's results: metrics.json (saved), the log line, tensorboard."""
        self.metrics.data["final"] = results
        self.metrics.save()
        described = ", ".join(f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
                              for key, value in results.items())
        protocol = (" (MocoSFL's protocol: the figures named _test_selected were selected on the test set, like "
                    "MocoSFL's; they are not comparable with the default protocol's)"
                    if results.get("eval_protocol") == "mocosfl" else "")
        logger.info(f"final evaluation{protocol}: {described}")
        for key, value in results.items():
            if isinstance(value, float):
                self.tensorboard.scalar(f"final/{key}", value, global_step)

    def close(self) -> None:
        """Flush and close tensorboard (safe to call twice)."""
        self.tensorboard.close()


class EpochStatistics:
    """Running sums of the method's per-step statistics over the epoch in progress, on the device (no per-step
    host transfer); checkpointed, so an epoch stopped and resumed reports the mean over all its steps."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, stats: dict[str, torch.Tensor], weight: float) -> None:
        """One step's statistics; under torchrun weighted by this rank's share of the step's rows."""
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.steps += 1

    def _global_sums(self) -> dict[str, float]:
        """The sums over every rank (an all-reduce under torchrun: every rank must call it)."""
        names = sorted(self.sums)
        if not names:
            return {}
        stacked = torch.stack([torch.as_tensor(self.sums[name], device=self.runtime.device).float() for name in names])
        if self.runtime.is_distributed:
            all_reduce_sum(stacked)
        return dict(zip(names, stacked.cpu().tolist()))

    def means(self) -> dict[str, float]:
        """The epoch's mean of every statistic so far (collective under torchrun)."""
        return {name: value / max(1, self.steps) for name, value in self._global_sums().items()}

    def reset(self) -> None:
        """A new epoch starts."""
        self.sums, self.steps = {}, 0

    def state_dict(self) -> dict[str, Any]:
        """The sums over every rank and the step count (collective under torchrun)."""
        return {"sums": self._global_sums(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved sums: rank 0 holds them, the other ranks start from zero, so the sum is right."""
        sums = state["sums"] if self.runtime.is_main else {name: 0.0 for name in state["sums"]}
        self.sums = {name: torch.tensor(float(value), device=self.runtime.device) for name, value in sums.items()}
        self.steps = int(state["steps"])
