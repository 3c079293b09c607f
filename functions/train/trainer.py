"""The one training loop of split federated self-supervised learning, for every registered method.

The Trainer owns a run's state (data, the split step, schedule, position, logs) and runs epochs of
`functions.sfl.step.SplitStep`: FedAvg `--avg_freq` times per epoch, learning rates as a pure function of
(epoch, step), the kNN monitor, atomic checkpoints. Starting, resuming and evaluating a run is functions.train.runner.
"""
from __future__ import annotations

import argparse
import copy
import random
import signal
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from configs import run_options, training_signature
from functions.core.checkpoint import (
    BEST_CHECKPOINT_NAME,
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    Checkpointed,
    check_checkpoint_layout,
    checkpoint_parts,
    first_non_finite,
    restore_rng_state,
    rng_state,
    save_atomic,
)
from functions.core.compat import mocosfl_compat
from functions.core.distributed import ClientHandOver, Runtime, all_reduce_max_flag, run_agreed
from functions.core.errors import TrainingInterrupted, UserError
from functions.core.logs import EpochStatistics, LogWindow, ProgressBar, TrainingLog, logger
from functions.core.precision import MixedPrecision, amp_dtype_of
from functions.data.datasets import resolved_entry
from functions.data.layout import StepLayout
from functions.evaluation.context import Evaluation, EvaluationContext, EvaluationOptions
from functions.methods.base import ServerMethod
from functions.methods.registry import method_class
from functions.net.remote import build_networked_clients
from functions.privacy.attack_mocosfl import attack_set_size
from functions.privacy.attack_run import auxiliary_images
from functions.privacy.defences import DefenceSetting, build_defences
from functions.sfl.clients.engines import ClientEngine
from functions.sfl.communication import CommunicationSaving, smashed_row_shapes
from functions.sfl.fedavg import average_pool, divergence_summary, fedavg, fedavg_positions
from functions.sfl.fedavg_rules import build_fedavg_rule
from functions.sfl.fl_step import build_fl_step
from functions.sfl.overhead import client_overhead
from functions.sfl.step import build_split_step, per_client_server_updates
from functions.train.evaluations import FINAL_EVALUATIONS, knn_evaluation
from functions.train.federated_data import FederatedData
from functions.train.resume_checks import ResumeCheckOptions, check_same_configuration
from functions.train.stopping import AgreedStopBatches, ResumeCommandOptions, StopSignal, WorkCutShort, resume_command


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _reason(error: Exception) -> str:
    """An exception's message on one line, shortened."""
    return " ".join(str(error).split())[:200] or type(error).__name__


class MethodExtraState(Checkpointed):
    """The server method's extra state (queues, counters) as a stateful part of the run."""

    def __init__(self, method: ServerMethod) -> None:
        self.method = method

    def state_dict(self) -> dict:
        return self.method.extra_state()

    def load_state_dict(self, state: dict) -> None:
        self.method.load_extra_state(state)


class Trainer:
    """One SFL run: its data, the split step (clients, server method, optimizers), schedule, position and logs;
    it writes and restores its own checkpoints (weights, optimizers, `parts`, position, RNG, metrics)."""

    def __init__(self, args: argparse.Namespace, runtime: Runtime, output_dir: Path,
                 evaluations: Sequence[Evaluation] = FINAL_EVALUATIONS, stop: StopSignal | None = None) -> None:
        self.args = args
        self.runtime = runtime
        self.device = runtime.device
        self.output_dir = output_dir
        self.evaluations = list(evaluations)
        # The run's stop signal (functions.train.runner installs it); the loop polls it between steps.
        self.stop = stop if stop is not None else StopSignal(announce=runtime.is_main)
        seed_everything(args.seed)
        method_cls = method_class(args.method)
        view_spec = method_cls.view_spec(args, resolved_entry(args.dataset, args.data_size))
        # Reads this node's disk: may fail on one rank only, so every rank stops with that rank's line.
        self.data = run_agreed(lambda: FederatedData.from_args(args, view_spec, runtime, output_dir))
        if (attack := EvaluationOptions.from_args(args).attack) is not None:
            # What the attack needs is checked now, not after training: enough images for MocoSFL's attacker, or
            # the auxiliary data present and of the run's image size.
            if attack.attack_protocol == "mocosfl":
                attack_set_size(len(self.data.dataset.train_images), attack.attack_data_proportion)
            else:
                run_agreed(lambda: auxiliary_images(attack, self.data.dataset.train_images.shape[1:3]))
        self.precision = MixedPrecision(amp_dtype_of(args.use_fp16, args.amp_dtype, runtime), runtime)
        build_step = build_fl_step if args.scheme == "fl" else build_split_step
        self.split_step = build_step(args, runtime, self.precision)
        self.overhead = client_overhead(self.split_step, view_spec, args.batch_size, args.cutlayer)
        # Privacy defences (--defence) act on smashed data: --scheme fl sends none (configs refuse the two together).
        self.defences = (build_defences(args, lambda: self._defence_setting(view_spec))
                         if self.split_step.sends_smashed_data else [])
        if self.defences:
            self.split_step.defences = self.defences
        if runtime.is_distributed and per_client_server_updates(args):
            raise UserError("per-client server updates (--server_update per_client) step the server once per client "
                            "in pool order and cannot be split over processes; run one process or the joint update")
        self.steps_per_epoch = self.data.steps_per_epoch
        self.lr_schedule = method_cls.learning_rate_schedule(args, self.steps_per_epoch)
        # Steps each client trained with gradients (its lr under --compat mocosfl, where it drives the schedule).
        self.client_steps = np.zeros(args.num_client, dtype=np.int64)
        self.epoch = 0            # epoch in progress (0-based)
        self.step_in_epoch = 0    # next step to run in that epoch
        self.global_step = 0      # steps done since the start of the run
        self.saved_step: int | None = None  # global step of the checkpoint this run wrote (rank 0 writes it)
        self.hand_over = ClientHandOver(args.num_client, runtime)
        self._agreed_stop = False
        self.log = TrainingLog(output_dir, runtime, method=args.method, data_backend=self.data.loaders.backend,
                               world_size=runtime.world_size, steps_per_epoch=self.steps_per_epoch,
                               partition_hash=self.data.partition_hash, overhead=asdict(self.overhead))
        self.epoch_statistics = EpochStatistics(runtime)
        # Real clients (--remote_clients): their engine wraps the loop engine, which keeps their mirrors.
        self.remote = build_networked_clients(args, self.split_step.clients, self.data, view_spec, self.method,
                                              runtime, run_options(args))
        if self.remote is not None:
            self.remote.log, self.split_step.clients = self.log, self.remote
        self.fedavg_rule = build_fedavg_rule(args)
        if runtime.is_distributed and mocosfl_compat(args) and args.client_sample_ratio < 1:
            raise UserError("--compat mocosfl averages client 0 into pools without it (as MocoSFL's FedAvg), which "
                            "torchrun's processes do not hold; run it in one process or with --client_sample_ratio 1")
        self.divergences: list[float] = []  # of the pool's clients at the last FedAvg (--divergence_measure)
        crop_sizes = [size for size, _ in view_spec.crops()]
        self.communication = (CommunicationSaving(args.loss_threshold, output_dir / "replay_tensors", runtime,
                                                  count_next_status=mocosfl_compat(args), num_client=args.num_client,
                                                  row_shapes=lambda: smashed_row_shapes(
                                                      self._first_client_part(), crop_sizes,
                                                      self.method.trainable_crops, self.method.momentum_crops))
                              if args.loss_threshold > 0 else None)
        # What a checkpoint keeps besides the weights, optimizers and position, by part name.
        self.parts: dict[str, Checkpointed] = {"method_extra": MethodExtraState(self.method),
                                           f"fedavg.{self.fedavg_rule.name}": self.fedavg_rule,
                                           **{f"defence.{defence.name}": defence for defence in self.defences}}
        if self.communication is not None:
            self.parts["communication"] = self.communication

    def _first_client_part(self) -> nn.Module:
        """A copy of client 0's part of the network."""
        return self.clients.module_with({name: rows[0] for name, rows in self.clients.stacked_state([0]).items()})

    def _defence_setting(self, view_spec: Any) -> DefenceSetting:
        """What the privacy defences are built for: client 0's part, the method's first trainable crop's size."""
        first_client = self._first_client_part()
        image_size = view_spec.crops()[self.method.trainable_crops[0]][0]
        dataset = self.data.dataset
        return DefenceSetting(first_client, image_size, dataset.mean, dataset.std, self.device,
                              distributed=self.runtime.is_distributed)

    @property
    def method(self) -> ServerMethod:
        """The server method (server part of the network, loss, state)."""
        return self.split_step.method

    @property
    def clients(self) -> ClientEngine:
        """Every client of this process (the loop or the vectorised engine)."""
        return self.split_step.clients

    # ---------------------------------------------------------------------------------------------- training
    def set_learning_rates(self, epoch: int, step: int) -> tuple[float, float]:
        """Set the server's and the clients' rates of this step; returns them (a pool client's, when they differ)."""
        server_lr, client_lr = self.lr_schedule.rates(epoch, step)
        if self.lr_schedule.per_client_steps:
            rates = [self.lr_schedule.client_rate_after_steps(int(steps)) for steps in self.client_steps]
            self.split_step.set_learning_rates(server_lr, rates)
            return server_lr, rates[self.data.pool(epoch)[0]]
        self.split_step.set_learning_rates(server_lr, client_lr)
        return server_lr, client_lr

    def train_step(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One SFL step over the pool at the run's position (see functions.sfl.step.SplitStep)."""
        pool, share = self.data.pool(self.epoch), self.data.row_share(batch, self.epoch)
        if self.remote is not None:  # the remote clients' smashed data; those that did not answer sit this step out
            batch = self.remote.gather(batch, self.epoch, self.step_in_epoch, self.global_step, pool)
            pool = batch.client_ids
        layout = StepLayout.of(batch.client_ids, batch.rows_per_client, pool, [self.data.batch_sizes[c] for c in pool])
        saving, step = self.communication, self.step_in_epoch
        if saving is None:
            return self.split_step(batch, self.epoch, self.global_step, share, layout)

        def keep(inputs: list[torch.Tensor], momentum: list[torch.Tensor]) -> None:
            saving.keep(step, inputs, momentum, layout, share)
            saving.count_step(inputs, momentum)

        return self.split_step(batch, self.epoch, self.global_step, share, layout,
                               send_gradients=saving.sends_gradients, record=keep)

    def replay_step(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        """A server-only step on the smashed data kept from `step` of the last communicating epoch."""
        inputs, momentum, layout, share = self.communication.replayed(step, self.device)
        self.communication.count_step(inputs, momentum)
        return (*self.split_step.replay(inputs, momentum, layout, self.epoch, self.global_step, share), share)

    def fedavg(self, pool: Sequence[int]) -> None:
        """FedAvg of the pool's clients weighted by data size, made the clients' weights by the run's FedAvg rule
        (over all ranks)."""
        include_momentum = self.method.average_momentum_copies and self.method.client_momentum > 0
        if self.remote is not None:  # remote clients that do not send their weights are left out of this average
            pool = self.remote.available_for_fedavg(pool, include_momentum)
        divergences = fedavg(self.clients, pool, self.data.client_sizes, self.runtime, include_momentum,
                             self.fedavg_rule, measure=self.args.divergence_measure,
                             mocosfl_compat=mocosfl_compat(self.args))
        if divergences is not None:
            self.divergences = divergences

    def stopping(self) -> bool:
        """Whether to stop: the signal itself in one process; under torchrun the decision all ranks agreed on."""
        return self._agreed_stop if self.runtime.is_distributed else self.stop.requested

    def agree_on_stop(self) -> None:
        """Under torchrun: stop when any rank got a signal (all ranks must leave the loop at the same step)."""
        if self.runtime.is_distributed:
            self._agreed_stop = all_reduce_max_flag(self.stop.requested or self._agreed_stop, self.device)

    def reached_max_steps(self) -> bool:
        """Whether --max_steps (when set) is reached."""
        return self.args.max_steps > 0 and self.global_step >= self.args.max_steps

    def train(self) -> None:
        """Run epochs until --num_epoch or --max_steps; on a stop signal save and raise TrainingInterrupted."""
        with self.stop.polling():
            self._train()

    def _train(self) -> None:
        args = self.args
        self.agree_on_stop()
        if self.global_step == 0 and args.eval_freq > 0 and not self.stopping():
            self.monitor_knn(0)
        while self.epoch < args.num_epoch and not self.reached_max_steps() and not self.stopping():
            self.train_epoch()
            self.agree_on_stop()
            if self.step_in_epoch == 0:  # the epoch finished (not cut by --max_steps or a signal)
                completed = self.epoch
                if args.eval_freq > 0 and completed % args.eval_freq == 0:
                    if self.stopping():  # save first: a scheduler's grace period may be short
                        logger.info(f"{self.stop.name or 'stop'}: skipping the kNN monitor of epoch {completed}")
                    else:
                        self.monitor_knn(completed)
                if not self.stopping():
                    self.save_checkpoint(best=self.knn_improved(completed))
        self.save_checkpoint()
        if self.stopping():
            self.interrupted()

    def interrupted(self) -> None:
        """Log and raise the stop of a signalled run (its checkpoint is saved); the message says how to resume."""
        message = (f"{self.stop.name or 'a stop signal (on another rank)'} received: stopped after step "
                   f"{self.global_step} (epoch {self.epoch + 1}, step {self.step_in_epoch} of {self.steps_per_epoch}) "
                   f"and saved {self.output_dir / CHECKPOINT_NAME}; "
                   f"resume with: {resume_command(ResumeCommandOptions.from_args(self.args))}")
        if self.runtime.is_main:  # every rank stops; one says so
            logger.warning(message)
        raise TrainingInterrupted(message, int(self.stop.signal_number or signal.SIGTERM), announce=self.runtime.is_main)

    def train_epoch(self) -> None:
        """Train the rest of the current epoch, or up to --max_steps, or until a stop signal (after a whole step)."""
        args, epoch = self.args, self.epoch
        pool = self.data.pool(epoch)
        if self.runtime.is_distributed:
            self.hand_over.hand_over(self.clients, pool)
        self.method.start_epoch(epoch)
        self.method.train()
        avg_after = fedavg_positions(self.steps_per_epoch, self.args.avg_freq)
        window = LogWindow()
        if self.step_in_epoch == 0:
            self.epoch_statistics.reset()
        bar = ProgressBar(self.steps_per_epoch, self.step_in_epoch, f"epoch {epoch + 1}/{args.num_epoch}",
                          enabled=self.runtime.is_main)
        first = True
        own = self.data.own_clients(epoch)
        replaying = self.communication is not None and self.communication.replaying
        batches = iter(self.communication.replay_order(self.steps_per_epoch, args.seed, epoch)[self.step_in_epoch:]
                       if replaying else self.data.loaders.train.epoch(
                           epoch, start_step=self.step_in_epoch, clients=own if self.runtime.is_distributed else
                           self.remote.local_clients(pool) if self.remote is not None else None))
        try:
            while not self.stopping():
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception:
                    # A signal sent to the whole process group also ends the data workers; the last step is complete.
                    if self.stop.requested:
                        break
                    raise
                step = self.step_in_epoch
                if first or self.lr_schedule.per_step:
                    window.server_lr, window.client_lr = self.set_learning_rates(epoch, step)
                    first = False
                if replaying:
                    loss, stats, share = self.replay_step(batch)
                else:
                    batch = batch.to(self.device)
                    loss, stats = self.train_step(batch)
                    share = self.data.row_share(batch, epoch)
                    if self.communication is None or self.communication.sends_gradients:
                        self.client_steps[pool] += 1
                self.global_step += 1
                self.step_in_epoch += 1
                # Under torchrun each rank logs its row-weighted part; the sum over ranks is the global loss.
                window.losses.append((self.global_step, loss * share if self.runtime.is_distributed else loss))
                window.images += self.data.pool_rows(epoch)
                self.epoch_statistics.add(stats, share)
                if step in avg_after:
                    self.fedavg(pool)
                bar.update()
                done = self.step_in_epoch == self.steps_per_epoch or self.reached_max_steps()
                if len(window.losses) >= args.log_freq or done:
                    self._log_window(window, bar)
                if done:
                    break
            if window.losses:  # stopped by a signal between log points: log (and check) the steps done
                self._log_window(window, bar)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # shuts data workers down now rather than at garbage collection
            bar.close()
        statistics = {**self.epoch_statistics.means(), **self.method.epoch_summary(), **divergence_summary(self.divergences)}
        self.log.epoch(epoch, self.global_step, window.server_lr, statistics, self.epoch_statistics.steps,
                       int(self.precision.skipped_steps) if self.precision.scaling else None)
        if self.step_in_epoch >= self.steps_per_epoch:
            if self.communication is not None:
                self.communication.end_epoch(epoch, self.log.mean_loss(self.epoch_statistics.steps), self.log,
                                             self.args.num_epoch)
            self.epoch += 1
            self.step_in_epoch = 0
        self.log.metrics.save()

    def _log_window(self, window: LogWindow, bar: ProgressBar) -> None:
        """Log the steps since the last log point; check the fp16 loss scale; agree on a stop under torchrun."""
        self.log.window(window, bar, f"epoch {self.epoch + 1}/{self.args.num_epoch} step {self.step_in_epoch}/"
                        f"{self.steps_per_epoch}", self.global_step, skipped_steps_allowed=self.precision.scaling,
                        last_good=self._last_good_checkpoint)
        if self.precision.scaling:
            self.log.loss_scale(self.global_step, *self.precision.check(self.global_step, self._last_good_checkpoint()))
        self.agree_on_stop()

    # ------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "args": run_options(self.args),
            "signature": training_signature(self.args),
            "partition_hash": self.data.partition_hash,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "method": self.method.state_dict(),
            "parts": {name: part.state_dict() for name, part in self.parts.items()},
            "clients": self.clients.state_dict(),
            "server_optimizer": self.split_step.server_optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "skipped_steps": int(self.precision.skipped_steps),
            "rng": rng_state(),
            "metrics": self.log.metrics.data,
            "epoch_statistics": self.epoch_statistics.state_dict(),
            "client_steps": self.client_steps.tolist(),
        }

    def knn_improved(self, epoch: int) -> bool:
        """Whether the kNN monitor after `epoch` is the run's best so far (the one before training not counted)."""
        scores = [(monitored, accuracy) for monitored, accuracy in self.log.metrics.data["knn_acc"] if monitored >= 1]
        now = [accuracy for monitored, accuracy in scores if monitored == epoch]
        return bool(now) and all(now[-1] > accuracy for monitored, accuracy in scores if monitored < epoch)

    def save_checkpoint(self, best: bool = False) -> None:
        """Write checkpoint_last.pt atomically, and with `best` the same state to checkpoint_best.pt; refuse
        (keeping the previous files) when the weights are not finite.

        Under torchrun every rank calls it: clients trained on other ranks send their state first, then every
        rank checks the same state (so all stop together on a non-finite one) and rank 0 writes.
        """
        if self.runtime.is_distributed:
            self.hand_over.share(self.clients, range(self.args.num_client))
        state = self.state_dict()
        broken = first_non_finite({key: state[key] for key in ("method", "parts", "clients", "server_optimizer")})
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
    def weights_of(self, state: dict[str, Any], source: str) -> Iterator[None]:
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

    def _load_weights(self, method_state: dict[str, Any], clients_state: dict[str, Any], source: str) -> None:
        """The server method's and the clients' weights (and client optimizers) from a checkpoint's parts; weights
        that are not finite are refused (this project never saves them, and their figures would mean nothing)."""
        broken = first_non_finite({"method": method_state, "clients": clients_state})
        if broken is not None:
            raise UserError(f"{source} holds non-finite weights ({broken} is NaN or infinite); nothing can be "
                            "evaluated or trained from it: use a checkpoint written by a run of this project")
        try:
            self.method.load_state_dict(method_state)
            self.clients.load_state_dict(clients_state)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
            raise UserError(f"{source} does not fit this run ({_reason(error)}); delete it or pass another "
                            "--output_dir") from None
        self.hand_over.all_current()  # every rank loaded every client's state

    def load_state_dict(self, state: dict[str, Any], check_signature: bool = True,
                        source: str = "the checkpoint") -> None:
        """Continue from a checkpoint: weights, optimizers, queues, position in the schedule, RNG and metrics."""
        check_checkpoint_layout(state, source)
        saved_clients = len(state.get("client_steps", self.client_steps))
        if state["step_in_epoch"] >= self.steps_per_epoch or saved_clients != self.args.num_client:
            raise UserError(f"{source} does not fit this run (it is at step {state['step_in_epoch']} of an epoch of "
                            f"{self.steps_per_epoch} steps and counts the steps of {saved_clients} clients, this run "
                            f"has {self.args.num_client}); delete it or pass another --output_dir")
        if check_signature:
            check_same_configuration(state, ResumeCheckOptions.from_args(self.args), self.data.partition_hash)
            self._check_num_epoch(state["args"].get("num_epoch", self.args.num_epoch))
        self._load_weights(state["method"], state["clients"], source)
        saved_parts = checkpoint_parts(state)
        try:
            for name, part in self.parts.items():
                if saved_parts.get(name) is not None:
                    part.load_state_dict(saved_parts[name])
            self.split_step.server_optimizer.load_state_dict(state["server_optimizer"])
            self.precision.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
            raise UserError(f"{source} does not fit this run ({_reason(error)}); delete it or pass another "
                            "--output_dir") from None
        self.precision.skipped_steps.fill_(int(state.get("skipped_steps", 0)))
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.epoch_statistics.load_state_dict(state.get("epoch_statistics", {"sums": {}, "steps": 0}))
        self.client_steps[:] = state["client_steps"] if "client_steps" in state else self._client_steps_so_far()
        try:
            restore_rng_state(state["rng"])
        except (RuntimeError, ValueError, TypeError) as error:
            raise UserError(f"{source} holds a broken random state ({_reason(error)}); delete it or pass another "
                            "--output_dir") from None
        metrics = self.log.metrics
        metrics.data = {**state["metrics"], **{key: metrics.data[key] for key in ("data_backend", "world_size")}}

    def _client_steps_so_far(self) -> np.ndarray:
        """Each client's steps up to the position, from the pools (checkpoints written before they were kept; the
        upload-only and replay epochs of --loss_threshold are counted as steps too)."""
        steps = np.zeros(self.args.num_client, dtype=np.int64)
        for epoch in range(self.epoch + (self.step_in_epoch > 0)):
            steps[self.data.pool(epoch)] += self.steps_per_epoch if epoch < self.epoch else self.step_in_epoch
        return steps

    def _check_num_epoch(self, saved_epochs: int) -> None:
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

    def _last_good_checkpoint(self) -> str:
        """Where the last checkpoint of healthy weights is, for error messages."""
        path = self.output_dir / CHECKPOINT_NAME
        if self.saved_step is not None:
            return f"the last good checkpoint is {path} (step {self.saved_step})"
        if path.is_file():
            return f"the last good checkpoint is {path} (the one this run resumed from)"
        return "no checkpoint was written yet"

    # -------------------------------------------------------------------------------------------- evaluation
    def close(self) -> None:
        """Flush and close the tensorboard writer and the device server (safe to call twice)."""
        if self.remote is not None:  # after a stop signal the devices wait for the resumed run
            self.remote.close(done=not self.stop.requested)
        self.log.close()

    def evaluation_context(self, agree_on_stop: bool = False) -> EvaluationContext:
        """The averaged client model followed by the server's backbone, in eval mode; every rank evaluates the same
        model (only rank 0 writes), so no rank waits on another. With `agree_on_stop` the ranks agree on a stop
        signal every few batches of its loaders (AgreedStopBatches)."""
        pool = self.data.pool(min(self.epoch, self.args.num_epoch - 1))
        client_model = self.clients.module_with(average_pool(self.clients, pool, self.data.client_sizes,
                                                             self.runtime)).eval()
        self.method.eval()
        dataset = self.data.dataset
        memory, test = self.data.loaders.memory, self.data.loaders.test
        if agree_on_stop:
            memory, test = (AgreedStopBatches(loader, self.stop, self.device) for loader in (memory, test))
        return EvaluationContext(self.split_step.encoder(client_model), client_model, memory, test,
                                 dataset.num_classes, self.args, self.device, EvaluationOptions.from_args(self.args),
                                 client_images=lambda client: dataset.train_images[self.data.client_indices[client]],
                                 train_images=lambda: dataset.train_images,
                                 mean=dataset.mean, std=dataset.std, is_main=self.runtime.is_main)

    def monitor_knn(self, epoch: int) -> None:
        """The kNN monitor inside the training loop; a stop signal ends it early, and the loop then saves and stops
        without deciding the epoch's best. In one process the signal ends it at once; under torchrun every rank must
        leave it at the same batch, so the ranks agree on a stop every few batches and all leave it together."""
        try:
            if self.runtime.is_distributed:
                self.log_knn(epoch, agree_on_stop=True)
            else:
                with self.stop.cut_short():
                    self.log_knn(epoch)
        except WorkCutShort as cut:
            self._agreed_stop = True  # under torchrun every rank got here at the same agreement
            self.method.train()
            logger.info(f"{cut}: the kNN monitor of epoch {epoch} was cut short")

    def log_knn(self, epoch: int, agree_on_stop: bool = False) -> float:
        """The kNN monitor after `epoch` (0 = before training): logged, saved to metrics.json, returned."""
        accuracy = knn_evaluation(self.evaluation_context(agree_on_stop))["knn_acc"]
        self.method.train()
        logger.info(f"kNN accuracy after epoch {epoch}: {accuracy:.2f} %")
        self.log.evaluation("knn_acc", epoch, accuracy)
        return accuracy

    def final_evaluation(self, model: str = CHECKPOINT_NAME) -> dict[str, Any]:
        """Every evaluation of the list the trainer was given, on the current model (that of `model`); logged and
        returned with the protocol, the model's file, step and epoch.

        metrics.json's `final` is written after each evaluation, so a later one that fails (or a stop signal) loses
        none of the results before it; an evaluation that fails is recorded under `failed` beside the others, the
        rest still run, and then the run stops with that failure.
        """
        context = self.evaluation_context()
        position = {"eval_protocol": self.args.eval_protocol, "model": model, "step": self.global_step,
                    "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch}
        results: dict[str, Any] = {}
        failed: dict[str, str] = {}
        first_error: Exception | None = None
        for evaluation in self.evaluations:
            try:
                results.update(evaluation(context))
            except TrainingInterrupted:
                raise
            except Exception as error:  # noqa: BLE001 - reported beside the other results, raised after them
                failed[evaluation_name(evaluation)] = _reason(error)
                first_error = first_error or error
            self.log.metrics.data["final"] = {**results, **position, **({"failed": failed} if failed else {})}
            self.log.metrics.save()
        self.method.train()
        results.update(position)
        if failed:
            results["failed"] = failed
        self.log.final(results, self.global_step)
        if first_error is not None:
            raise failed_evaluation_error(failed, first_error, self.log.metrics.path)
        return results


def evaluation_name(evaluation: Evaluation) -> str:
    """The name an evaluation is reported under (its function's name)."""
    return getattr(evaluation, "__name__", type(evaluation).__name__)


def failed_evaluation_error(failed: dict[str, str], first_error: Exception, metrics_path: Path) -> Exception:
    """What a final evaluation that failed raises once the others are saved: one line for a user's error, the error
    itself (with its traceback) for anything else."""
    if not isinstance(first_error, UserError):
        return first_error
    named = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
    return UserError(f"final evaluation failed ({named}); the other results are saved in {metrics_path}")
