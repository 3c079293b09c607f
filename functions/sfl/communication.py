"""MocoSFL's loss-based communication saving (--loss_threshold): when the training loss has stopped falling fast,
the clients first stop receiving gradients, then stop sending smashed data too, and the server trains on the
smashed data the clients sent last ("replay").

Epoch by epoch (after the first 10, which always communicate), with delta = how much the epoch loss fell:
delta < threshold moves the status A -> B -> C (C stays C), anything else goes back to A.

* A: full split learning (smashed data up, gradients down);
* B: smashed data up only; the server trains, the clients stay as they are;
* C: nothing is sent; the server replays, in a shuffled order, the steps of the last A or B epoch.

The saving is counted as MocoSFL measures it, C + B / 2 epochs, over the statuses the epochs trained in; MocoSFL's
code counts the status each epoch leaves for the next one instead (the statuses of epochs 2 .. N + 1), which
`--compat mocosfl` reproduces. The bytes not sent are counted here as well.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from functions.core.checkpoint import Checkpointed, is_count
from functions.core.distributed import Runtime, all_reduce_sum
from functions.core.errors import UserError
from functions.core.files import write_atomic
from functions.data.layout import StepLayout
from models.split import smashed_row_shape

logger = logging.getLogger("sfl")
FULL, UPLOAD_ONLY, REPLAY = "A", "B", "C"
WARMUP_EPOCHS = 10  # MocoSFL: the first epochs always communicate
REPLAY_KEYS = frozenset({"inputs", "momentum", "layout", "row_share"})
REPLAY_FIX = "it is not what this run kept; delete the run's checkpoint to start over, or choose another --output_dir"
# The shape of one row of smashed data of each trainable crop, then of each momentum crop.
RowShapes = tuple[list[tuple[int, ...]], list[tuple[int, ...]]]


def _layout_problem(layout: Any, num_client: int | None) -> str | None:
    """What is wrong with a replay file's layout (client ids and rows of this process, then of the pool), or None."""
    if not (isinstance(layout, list) and len(layout) == 4
            and all(isinstance(part, list) and all(is_count(v) for v in part) for part in layout)):
        return "its layout is not four lists of counts"
    client_ids, rows, pool_ids, pool_rows = layout
    if len(client_ids) != len(rows) or len(pool_ids) != len(pool_rows) or not set(client_ids) <= set(pool_ids):
        return "its layout's clients and rows do not match"
    if num_client is not None and any(client >= num_client for client in pool_ids):
        return f"its layout names clients beyond this run's {num_client}"
    return None


def smashed_row_shapes(client_part: nn.Module, crop_sizes: Sequence[int], trainable_crops: Sequence[int],
                       momentum_crops: Sequence[int]) -> RowShapes:
    """The shape of one row of smashed data of each trainable crop, then of each momentum crop (what a replay file
    holds)."""
    return ([smashed_row_shape(client_part, crop_sizes[crop]) for crop in trainable_crops],
            [smashed_row_shape(client_part, crop_sizes[crop]) for crop in momentum_crops])


def replay_file_problem(kept: Any, row_shapes: RowShapes | None, num_client: int | None) -> str | None:
    """What is wrong with the content of a replay file (what CommunicationSaving.keep writes), or None; with
    `row_shapes`, the shape of a row of each kept tensor is checked too."""
    if not isinstance(kept, dict) or set(kept) != REPLAY_KEYS:
        return "it is not the smashed data of a step"
    problem = _layout_problem(kept["layout"], num_client)
    if problem:
        return problem
    share = kept["row_share"]
    if not (isinstance(share, float) and 0 < share <= 1):
        return f"its row share is {share!r}"
    rows = sum(kept["layout"][1])
    expected = row_shapes or ([None] * len(kept["inputs"]), [None] * len(kept["momentum"]))
    for name, tensors, shapes in (("inputs", kept["inputs"], expected[0]), ("momentum", kept["momentum"],
                                                                          expected[1])):
        if not isinstance(tensors, list) or len(tensors) != len(shapes):
            return f"its {name} are not {len(shapes)} tensors"
        for tensor, shape in zip(tensors, shapes):
            if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() >= 1):
                return f"its {name} are not floating-point tensors"
            if tensor.shape[0] != rows or (shape is not None and tuple(tensor.shape[1:]) != tuple(shape)):
                wanted = f"({rows}, {', '.join(map(str, shape))})" if shape is not None else f"{rows} rows"
                return f"its {name} have shape {tuple(tensor.shape)}, expected {wanted}"
    return None


def next_status(status: str, previous_loss: float, loss: float, threshold: float, epoch: int) -> str:
    """The status of the next epoch after an epoch (1-based `epoch`) that ended with mean loss `loss`."""
    delta = threshold if epoch <= WARMUP_EPOCHS else max(previous_loss - loss, 0.0)
    if delta < threshold:
        return UPLOAD_ONLY if status == FULL else REPLAY
    return FULL


class CommunicationSaving(Checkpointed):
    """The status of each epoch, the smashed data kept for replay (files in the run folder) and what was saved."""

    def __init__(self, threshold: float, folder: Path, runtime: Runtime, count_next_status: bool = False,
                 num_client: int | None = None, row_shapes: Callable[[], RowShapes] | None = None) -> None:
        self.threshold = float(threshold)
        # What a replay file must hold: clients below num_client, rows of these shapes (computed at the first replay).
        self.num_client = num_client
        self.row_shapes = row_shapes
        self._row_shapes: RowShapes | None = None
        self.count_next_status = count_next_status  # --compat mocosfl: MocoSFL's count, shifted by one epoch
        self.folder = folder
        self.runtime = runtime
        self.status = FULL
        self.previous_loss = math.inf
        self.epochs = {FULL: 0, UPLOAD_ONLY: 0, REPLAY: 0}
        self.bytes_saved = 0        # over every process, up to the last finished epoch
        self._epoch_bytes = 0       # this process's, in the epoch in progress

    @property
    def sends_gradients(self) -> bool:
        """Whether the clients receive gradients in this epoch."""
        return self.status == FULL

    @property
    def replaying(self) -> bool:
        """Whether this epoch replays kept smashed data instead of asking the clients."""
        return self.status == REPLAY

    def count_step(self, server_inputs: list[Tensor], momentum_smashed: list[Tensor]) -> None:
        """A step of the current epoch did not send what its status skips (smashed data up, gradients down)."""
        download = sum(x.numel() * x.element_size() for x in server_inputs)
        upload = download + sum(x.numel() * x.element_size() for x in momentum_smashed)
        self._epoch_bytes += {FULL: 0, UPLOAD_ONLY: download, REPLAY: upload + download}[self.status]

    def end_epoch(self, epoch: int, loss: float, log: Any, num_epoch: int) -> str:
        """Record the finished epoch (0-based `epoch`, its mean loss) in the run's log; returns the next status."""
        epoch_bytes = torch.tensor([float(self._epoch_bytes)], device=self.runtime.device)
        self.bytes_saved += int(all_reduce_sum(epoch_bytes).item())
        self._epoch_bytes = 0
        was = self.status
        self.status = next_status(was, self.previous_loss, loss, self.threshold, epoch + 1)
        self.epochs[self.status if self.count_next_status else was] += 1
        self.previous_loss = loss
        for name, value in (("communication_status", "ABC".index(was)), ("communication_bytes_saved",
                            self.bytes_saved), ("communication_epochs_saved", self.saved_epochs)):
            log.metrics.append(name, epoch + 1, value)
        logger.info(f"communication: epoch {epoch + 1} was {was}, the next is {self.status}; saved {self.bytes_saved} "
                    f"bytes and {self.saved_epochs:g} epochs of {num_epoch} (C + B/2 "
                    f"{'of the next epochs, as MocoSFL counts' if self.count_next_status else 'epochs, as MocoSFL'})")
        return self.status

    @property
    def saved_epochs(self) -> float:
        """MocoSFL's measure of the saving: replay epochs plus half the upload-only ones (with count_next_status,
        those of the statuses after each epoch, as MocoSFL's code counts)."""
        return self.epochs[REPLAY] + self.epochs[UPLOAD_ONLY] / 2

    # --------------------------------------------------------------------------------------------- replay
    def _path(self, step: int) -> Path:
        return self.folder / f"rank{self.runtime.rank}_step{step}.pt"

    def _writable_folder(self) -> Path:
        """The replay folder, created; a symbolic link there (it would take the files out of the run folder) or a
        folder that cannot be made is one line."""
        if self.folder.is_symlink():
            raise UserError(f"{self.folder} is a symbolic link; a run writes its replay files only in its own folder: "
                            "remove the link, or choose another --output_dir")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--loss_threshold: cannot write {self.folder} ({error.strerror or error}); choose "
                            "another --output_dir") from None
        return self.folder

    def keep(self, step: int, server_inputs: list[Tensor], momentum_smashed: list[Tensor], layout: StepLayout,
             row_share: float) -> None:
        """Keep a step's smashed data for a later replay epoch (replaces that step of an earlier epoch, atomically:
        a reader finds the previous file or this one)."""
        self._writable_folder()
        kept = {"inputs": [x.detach().cpu() for x in server_inputs],
                "momentum": [x.detach().cpu() for x in momentum_smashed],
                "layout": [list(layout.client_ids), list(layout.rows_per_client), list(layout.pool_ids),
                           list(layout.pool_rows)], "row_share": row_share}
        # Rewritten every step: not forced to disk (a file damaged by a power cut is refused when read).
        write_atomic(self._path(step), lambda stream: torch.save(kept, stream), durable=False)

    def replay_order(self, steps: int, seed: int, epoch: int) -> list[int]:
        """`steps` kept steps in the replay order of `epoch` (shuffled, the same on every rank; when an earlier
        epoch was cut short, the kept steps come round again)."""
        order = np.random.default_rng([seed, 0x52504C59, epoch]).permutation(steps)
        kept = [int(step) for step in order if self._path(int(step)).is_file()]
        if not kept:
            raise UserError(f"--loss_threshold: no smashed data kept in {self.folder} to replay; it is written by the "
                            "epochs that communicate (remove the folder's checkpoint to start over)")
        return [kept[index % len(kept)] for index in range(steps)]

    def replayed(self, step: int, device: torch.device) -> tuple[list[Tensor], list[Tensor], StepLayout, float]:
        """What `keep` stored for `step`, on `device`; a file that is not what `keep` writes is one line."""
        path = self._path(step)
        try:
            with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as stream:
                kept = torch.load(stream, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file (truncated, crafted, a link) is refused
            raise UserError(f"--loss_threshold: cannot replay {path} ({type(error).__name__}): {REPLAY_FIX}") from None
        if self._row_shapes is None and self.row_shapes is not None:
            self._row_shapes = self.row_shapes()
        problem = replay_file_problem(kept, self._row_shapes, self.num_client)
        if problem:
            raise UserError(f"--loss_threshold: cannot replay {path} ({problem}): {REPLAY_FIX}")
        return ([x.to(device) for x in kept["inputs"]], [x.to(device) for x in kept["momentum"]],
                StepLayout.of(*kept["layout"]), float(kept["row_share"]))

    # --------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"status": self.status, "previous_loss": self.previous_loss, "epochs": dict(self.epochs),
                "bytes_saved": self.bytes_saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.status, self.previous_loss = state["status"], float(state["previous_loss"])
        self.epochs, self.bytes_saved = dict(state["epochs"]), int(state["bytes_saved"])
