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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from functions.core.checkpoint import Checkpointed
from functions.core.distributed import Runtime, all_reduce_sum
from functions.core.errors import UserError
from functions.data.layout import StepLayout

logger = logging.getLogger("sfl")
FULL, UPLOAD_ONLY, REPLAY = "A", "B", "C"
WARMUP_EPOCHS = 10  # MocoSFL: the first epochs always communicate


def next_status(status: str, previous_loss: float, loss: float, threshold: float, epoch: int) -> str:
    """The status of the next epoch after an epoch (1-based `epoch`) that ended with mean loss `loss`."""
    delta = threshold if epoch <= WARMUP_EPOCHS else max(previous_loss - loss, 0.0)
    if delta < threshold:
        return UPLOAD_ONLY if status == FULL else REPLAY
    return FULL


class CommunicationSaving(Checkpointed):
    """The status of each epoch, the smashed data kept for replay (files in the run folder) and what was saved."""

    def __init__(self, threshold: float, folder: Path, runtime: Runtime, count_next_status: bool = False) -> None:
        self.threshold = float(threshold)
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

    def keep(self, step: int, server_inputs: list[Tensor], momentum_smashed: list[Tensor], layout: StepLayout,
             row_share: float) -> None:
        """Keep a step's smashed data for a later replay epoch (overwrites that step of an earlier epoch)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"inputs": [x.detach().cpu() for x in server_inputs],
                    "momentum": [x.detach().cpu() for x in momentum_smashed],
                    "layout": [list(layout.client_ids), list(layout.rows_per_client), list(layout.pool_ids),
                               list(layout.pool_rows)], "row_share": row_share}, self._path(step))

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
        """What `keep` stored for `step`, on `device`."""
        kept = torch.load(self._path(step), map_location="cpu", weights_only=True)
        return ([x.to(device) for x in kept["inputs"]], [x.to(device) for x in kept["momentum"]],
                StepLayout.of(*kept["layout"]), float(kept["row_share"]))

    # --------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"status": self.status, "previous_loss": self.previous_loss, "epochs": dict(self.epochs),
                "bytes_saved": self.bytes_saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.status, self.previous_loss = state["status"], float(state["previous_loss"])
        self.epochs, self.bytes_saved = dict(state["epochs"]), int(state["bytes_saved"])
