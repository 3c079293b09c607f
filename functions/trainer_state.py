"""What a Trainer writes to and restores from checkpoint_last.pt: weights, optimizers, the method's and the loop's
state, the position in the schedule, RNG and metrics (see functions.checkpoint for the file itself)."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from configs import run_options, training_signature
from functions.checkpoint import (BEST_CHECKPOINT_NAME, CHECKPOINT_FORMAT, CHECKPOINT_NAME,
                                  check_checkpoint_layout, check_same_configuration, first_non_finite,
                                  restore_rng_state, rng_state, save_atomic)
from functions.distributed import run_agreed
from functions.errors import UserError
from functions.logs import logger

if TYPE_CHECKING:
    from functions.simulator import Trainer


def _reason(error: Exception) -> str:
    """An exception's message on one line, shortened."""
    return " ".join(str(error).split())[:200] or type(error).__name__


class TrainerCheckpoints:
    """The checkpoint methods of functions.simulator.Trainer."""

    def state_dict(self: Trainer) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "args": run_options(self.args),
            "signature": training_signature(self.args),
            "partition_hash": self.data.partition_hash,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "method": self.method.state_dict(), "method_extra": self.method.extra_state(),
            "clients": self.clients.state_dict(),
            "server_optimizer": self.split_step.server_optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "skipped_steps": int(self.precision.skipped_steps),
            "rng": rng_state(),
            "metrics": self.log.metrics.data,
            "epoch_statistics": self.epoch_statistics.state_dict(),
            "fedavg_state": self.divergence_aware.state_dict() if self.divergence_aware is not None else None,
            "communication": self.communication.state_dict() if self.communication is not None else None,
            "ressfl": self.attacker.state_dict() if self.attacker is not None else None,
            "client_steps": self.client_steps.tolist(),
        }

    def knn_improved(self: Trainer, epoch: int) -> bool:
        """Whether the kNN monitor after `epoch` is the run's best so far (the one before training not counted)."""
        scores = [(monitored, accuracy) for monitored, accuracy in self.log.metrics.data["knn_acc"] if monitored >= 1]
        now = [accuracy for monitored, accuracy in scores if monitored == epoch]
        return bool(now) and all(now[-1] > accuracy for monitored, accuracy in scores if monitored < epoch)

    def save_checkpoint(self: Trainer, best: bool = False) -> None:
        """Write checkpoint_last.pt atomically, and with `best` the same state to checkpoint_best.pt; refuse
        (keeping the previous files) when the weights are not finite.

        Under torchrun every rank calls it: clients trained on other ranks send their state first, then every
        rank checks the same state (so all stop together on a non-finite one) and rank 0 writes.
        """
        if self.runtime.is_distributed:
            self.hand_over.share(self.clients, range(self.args.num_client))
        state = self.state_dict()
        broken = first_non_finite({key: state[key] for key in ("method", "method_extra", "clients", "server_optimizer")})
        if broken is not None:
            where = f"; {self._last_good_checkpoint()} (try a lower --lr)" if self.runtime.is_main else ""
            raise UserError(f"{broken} became non-finite by step {self.global_step}; stopped without saving that "
                            f"state{where}")
        path = self.output_dir / CHECKPOINT_NAME
        # Agreed: when rank 0 cannot write (a full disk), every rank stops with its one line instead of hanging.
        run_agreed(lambda: save_atomic(state, path) if self.runtime.is_main else None)
        self.saved_step = self.global_step
        if best:
            run_agreed(lambda: save_atomic(state, path.with_name(BEST_CHECKPOINT_NAME)) if self.runtime.is_main
                       else None)
            logger.info(f"best kNN accuracy so far: saved {path.with_name(BEST_CHECKPOINT_NAME)}")

    @contextmanager
    def weights_of(self: Trainer, state: dict[str, Any], source: str) -> Iterator[None]:
        """Within the block, the weights and position of another checkpoint of this run (checkpoint_best.pt), for
        evaluation; the trainer's own come back after it."""
        own = copy.deepcopy({"method": self.method.state_dict(), "clients": self.clients.state_dict(),
                             "position": (self.epoch, self.step_in_epoch, self.global_step)})
        self._load_weights(state["method"], state["clients"], source)
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        try:
            yield
        finally:
            self._load_weights(own["method"], own["clients"], "the trainer's own state")
            self.epoch, self.step_in_epoch, self.global_step = own["position"]

    def _load_weights(self: Trainer, method_state: dict[str, Any], clients_state: dict[str, Any], source: str) -> None:
        """The server method's and the clients' weights (and client optimizers) from a checkpoint's parts."""
        try:
            self.method.load_state_dict(method_state)
            self.clients.load_state_dict(clients_state)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
            raise UserError(f"{source} does not fit this run ({_reason(error)}); delete it or pass another "
                            "--output_dir") from None
        self.hand_over.all_current()  # every rank loaded every client's state

    def load_state_dict(self: Trainer, state: dict[str, Any], check_signature: bool = True,
                        source: str = "the checkpoint") -> None:
        """Continue from a checkpoint: weights, optimizers, queues, position in the schedule, RNG and metrics."""
        check_checkpoint_layout(state, source)
        if check_signature:
            check_same_configuration(state, self.args, self.data.partition_hash)
            self._check_num_epoch(state["args"].get("num_epoch", self.args.num_epoch))
        self._load_weights(state["method"], state["clients"], source)
        try:
            self.method.load_extra_state(state["method_extra"])
            self.split_step.server_optimizer.load_state_dict(state["server_optimizer"])
            self.precision.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
            raise UserError(f"{source} does not fit this run ({_reason(error)}); delete it or pass another "
                            "--output_dir") from None
        self.precision.skipped_steps.fill_(int(state.get("skipped_steps", 0)))
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.epoch_statistics.load_state_dict(state.get("epoch_statistics", {"sums": {}, "steps": 0}))
        for part, key in ((self.divergence_aware, "fedavg_state"), (self.communication, "communication"),
                          (self.attacker, "ressfl")):
            if part is not None and state.get(key) is not None:
                part.load_state_dict(state[key])
        self.client_steps[:] = state["client_steps"] if "client_steps" in state else self._client_steps_so_far()
        restore_rng_state(state["rng"])
        metrics = self.log.metrics
        metrics.data = {**state["metrics"], **{key: metrics.data[key] for key in ("data_backend", "world_size")}}

    def _client_steps_so_far(self: Trainer) -> np.ndarray:
        """Each client's steps up to the position, from the pools (checkpoints written before they were kept; the
        upload-only and replay epochs of --loss_threshold are counted as steps too)."""
        steps = np.zeros(self.args.num_client, dtype=np.int64)
        for epoch in range(self.epoch + (self.step_in_epoch > 0)):
            steps[self.data.pool(epoch)] += self.steps_per_epoch if epoch < self.epoch else self.step_in_epoch
        return steps

    def _check_num_epoch(self: Trainer, saved_epochs: int) -> None:
        """A resumed run may train more (or fewer) epochs only where --num_epoch does not shape the learning rates."""
        if saved_epochs == self.args.num_epoch:
            return
        if self.lr_schedule.depends_on_num_epoch:
            raise UserError(f"the checkpoint in {self.args.output_dir} was made with --num_epoch {saved_epochs}, this "
                            f"run has --num_epoch {self.args.num_epoch}: the learning-rate schedule spans the epochs, "
                            f"so the steps already taken would not fit it; resume with --num_epoch {saved_epochs} "
                            "(--max_steps stops earlier), or start a new --output_dir")
        logger.info(f"continuing for --num_epoch {self.args.num_epoch} (the checkpoint was made for {saved_epochs}); "
                    "the learning-rate schedule does not depend on it")

    def _last_good_checkpoint(self: Trainer) -> str:
        """Where the last checkpoint of healthy weights is, for error messages."""
        path = self.output_dir / CHECKPOINT_NAME
        if self.saved_step is not None:
            return f"the last good checkpoint is {path} (step {self.saved_step})"
        if path.is_file():
            return f"the last good checkpoint is {path} (the one this run resumed from)"
        return "no checkpoint was written yet"
