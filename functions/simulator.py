"""The one training loop of split federated self-supervised learning, shared by MoCo and SwAV.

Per step: the pool's clients run their layers on their own rows, the server stacks all rows and computes
the method's loss, one backward and one server step, the gradient rows go back to the clients that sent
them, each client steps. FedAvg `--avg_freq` times per epoch; learning rates are a pure function of
(epoch, step); kNN monitor, atomic checkpoints, tensorboard, output.log and metrics.json in the run folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from configs import save_resolved_config, training_signature, parse_hetero_string
from functions.checkpoint import CHECKPOINT_NAME, load_checkpoint, remove_stale_temporaries, save_atomic
from functions.cifar import ImageDataset, load_dataset
from functions.clients import ClientSide, query_index
from functions.clients_vmap import VectorisedClientSide
from functions.distributed import (Runtime, all_reduce_max_flag, all_reduce_sum, broadcast_object,
                                   check_clients_per_rank, client_shares, launcher_prefix, planned_world_size,
                                   run_agreed, setup_runtime, shutdown_runtime, wrap_server)
from functions.errors import TrainingInterrupted, UserError
from functions.evaluation import extract_features, knn_accuracy, linear_probe, semi_supervised_probes
from functions.files import write_text_atomic
from functions.loaders import FederatedLoaders, FederatedSchedule, pool_size_of, default_steps_per_epoch
from functions.partition import make_partition, partition_hash, save_partition
from functions.server_method import ServerMethod, ViewSpec
from models.resnet import build_split_resnet

CHECKPOINT_FORMAT = 1
# Keys every checkpoint of this format holds; a file without them is refused before anything is loaded.
CHECKPOINT_KEYS = frozenset({"format", "args", "signature", "partition_hash", "epoch", "step_in_epoch", "global_step",
                             "method", "method_extra", "clients", "server_optimizer", "scaler", "rng", "metrics"})
# Set to 1 (or any non-empty value other than 0) to never download CIFAR: a missing folder is then an error at once.
NO_DOWNLOAD_ENV = "SFL_NO_DOWNLOAD"
# Below this fp16 loss scale even unscaled gradients overflow: the run has diverged, skipping steps cannot save it.
MIN_LOSS_SCALE = 1.0
logger = logging.getLogger("sfl")

MethodFactory = Callable[[argparse.Namespace, nn.Module, torch.device], ServerMethod]


# ----------------------------------------------------------------------------------------------- set-up helpers
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def prepare_output_dir(path: str) -> Path:
    output_dir = Path(path)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write_test.{os.getpid()}"  # one per process: ranks probe the same folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--output_dir {path} is not writable ({error.strerror}); choose another folder") from None
    return output_dir


def client_batch_sizes(args: argparse.Namespace, client_sizes: Sequence[int]) -> list[int]:
    """Rows each client sends per step: --batch_size, or with --hetero proportional to the client's data size."""
    if not args.hetero:
        return [args.batch_size] * len(client_sizes)
    mean_size = float(np.mean(client_sizes))
    return [max(1, int(round(args.batch_size * size / mean_size))) for size in client_sizes]


def hetero_partition(num_samples: int, num_client: int, hetero_string: str, seed: int) -> list[np.ndarray]:
    """IID split where a fraction A of clients (rich) holds a fraction B of the data (MocoSFL's --hetero_string)."""
    rich_fraction, rich_data, _ = parse_hetero_string(hetero_string)
    num_rich = max(1, int(round(rich_fraction * num_client)))
    if num_rich >= num_client:
        raise UserError(f"--hetero_string {hetero_string!r} leaves no poor clients among {num_client}")
    order = np.random.default_rng([seed, 7]).permutation(num_samples)
    rich_total = int(round(rich_data * num_samples))
    rich_parts = np.array_split(order[:rich_total], num_rich)
    poor_parts = np.array_split(order[rich_total:], num_client - num_rich)
    parts = [np.sort(part).astype(np.int64) for part in (*rich_parts, *poor_parts)]
    if min(len(part) for part in parts) == 0:
        raise UserError(f"--hetero_string {hetero_string!r} leaves a client with no data; use fewer clients")
    return parts


class LearningRateSchedule:
    """Server and client learning rates as a pure function of (epoch, step in epoch): nothing to checkpoint."""

    def __init__(self, args: argparse.Namespace, steps_per_epoch: int) -> None:
        self.args = args
        self.steps_per_epoch = steps_per_epoch

    def rates(self, epoch: int, step: int) -> tuple[float, float]:
        args = self.args
        if getattr(args, "use_swav_scheduler", False):
            return (self._warmup_cosine(args.lr, args.final_s_lr, epoch, step),
                    self._warmup_cosine(args.c_lr, args.final_c_lr, epoch, step))
        if args.cos:
            factor = 0.5 * (1.0 + math.cos(math.pi * epoch / args.num_epoch))
            return args.lr * factor, args.c_lr * factor
        passed = sum(1 for milestone in args.milestones if epoch >= milestone)
        return args.lr * args.s_gamma ** passed, args.c_lr * args.c_gamma ** passed

    def _warmup_cosine(self, base: float, final: float, epoch: int, step: int) -> float:
        """SwAV's schedule: linear warm-up from --start_warmup, then cosine to the final lr, per step."""
        iteration = epoch * self.steps_per_epoch + step
        warmup = self.args.warmup_epochs * self.steps_per_epoch
        if iteration < warmup:
            return self.args.start_warmup + (base - self.args.start_warmup) * iteration / warmup
        total = max(1, self.args.num_epoch * self.steps_per_epoch - warmup)
        progress = min(1.0, (iteration - warmup) / total)
        return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def download_allowed() -> bool:
    """Whether a missing CIFAR folder may be downloaded (not when SFL_NO_DOWNLOAD is set, e.g. offline clusters)."""
    return os.environ.get(NO_DOWNLOAD_ENV, "").strip() in ("", "0")


class StopSignal:
    """SIGTERM / SIGINT turned into a request the loop polls between steps; a second SIGINT stops at once."""

    HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

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
        if self.requested:
            if signal_number == signal.SIGINT:
                # The user insists (a second Ctrl-C): abandon the step; save_atomic removes its temporary file.
                raise KeyboardInterrupt
            # A repeated SIGTERM changes nothing: torchrun sends it more than once while stopping its workers,
            # and a scheduler that will not wait follows up with SIGKILL anyway.
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


@dataclass
class LogWindow:
    """The steps since the last log point: their losses (still on the device), images and learning rates."""

    losses: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    images: int = 0
    start: float = field(default_factory=time.perf_counter)
    server_lr: float = 0.0
    client_lr: float = 0.0


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run: the one that started it plus --resume, or its saved config."""
    script = "run_sflmoco.py" if args.method == "moco" else "run_sflswav.py"
    if Path(sys.argv[0]).name == script:
        arguments = [sys.argv[0], *(a for a in sys.argv[1:] if a != "--resume"), "--resume"]
    else:
        # Called from Python (not the entry script): the run folder's config.yaml holds every resolved option.
        arguments = [script, "--config", str(Path(args.output_dir) / "config.yaml"), "--resume"]
    return f"{launcher_prefix()} {shlex.join(arguments)}"


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


def fedavg_positions(steps_per_epoch: int, avg_freq: int) -> set[int]:
    """Steps (0-based, within an epoch) after which FedAvg runs: avg_freq times, evenly spaced, the last at the end."""
    return {max(0, round((i + 1) * steps_per_epoch / avg_freq) - 1) for i in range(avg_freq)}


# ------------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Everything one SFL run holds: data, clients, server method, optimizers, schedule, logs, checkpoints."""

    def __init__(self, args: argparse.Namespace, build_method: MethodFactory, view_spec: ViewSpec,
                 runtime: Runtime, output_dir: Path) -> None:
        self.args = args
        self.runtime = runtime
        self.device = runtime.device
        self.output_dir = output_dir
        self.stop = StopSignal()  # listens only inside `with trainer.stop:` (see run())
        seed_everything(args.seed)
        run_agreed(lambda: self._prepare_data(view_spec))  # reads this node's disk: may fail on one rank only

        split = build_split_resnet(**model_options(args))
        # Before the method copies the server (MoCo's key encoder), so every copy has the same layout.
        self.memory_format = torch.channels_last if getattr(args, "channels_last", False) else torch.contiguous_format
        self.method = build_method(args, split.server.to(self.device, memory_format=self.memory_format), self.device)
        if getattr(args, "compile", False):
            # In place, so parameter names (and checkpoints) stay those of the plain module.
            self.method.server.compile()
        if runtime.is_distributed:
            wrap_server(self.method, runtime)  # before the optimizer: BatchNorm layers are replaced
        client_side = VectorisedClientSide if args.client_exec == "vmap" else ClientSide
        self.clients = client_side(split.client, args.num_client, lr=args.c_lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay, keep_momentum_copies=self.method.client_momentum > 0,
                                  device=self.device, memory_format=self.memory_format)
        self.server_optimizer = torch.optim.SGD(self.method.optimized_parameters(), lr=args.lr,
                                                momentum=args.momentum, weight_decay=args.weight_decay)
        self.lr_schedule = LearningRateSchedule(args, self.steps_per_epoch)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        # Steps whose update the GradScaler skipped (inf/NaN gradients), counted on the device: read at log points.
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=self.device)
        self.epoch = 0            # epoch in progress (0-based)
        self.step_in_epoch = 0    # next step to run in that epoch
        self.global_step = 0      # steps done since the start of the run
        self.saved_step: int | None = None  # global step of the checkpoint this run wrote (rank 0 writes it)
        # Rank holding the current state of each client (momentum copy, optimizer) when only one does; -1: all do.
        self.client_holder = np.full(args.num_client, -1, dtype=np.int64)
        self._agreed_stop = False
        self._pool_rows: dict[int, int] = {}
        self.metrics = MetricsLog(output_dir / "metrics.json", enabled=runtime.is_main, method=args.method, data_backend=self.loaders.backend,
                                  world_size=runtime.world_size, steps_per_epoch=self.steps_per_epoch,
                                  partition_hash=self.partition_hash)
        self.tensorboard = TensorboardLog(output_dir / "tensorboard", enabled=runtime.is_main)

    # -------------------------------------------------------------------------------------------- construction
    def _prepare_data(self, view_spec: ViewSpec) -> None:
        """The dataset, the partition, the step schedule and the loaders of this process."""
        args, runtime = self.args, self.runtime
        self.dataset: ImageDataset = load_dataset(args.dataset, args.data_dir, download=download_allowed(),
                                                  data_proportion=args.data_proportion, seed=args.seed)
        self.client_indices = self._partition()
        self.client_sizes = [len(indices) for indices in self.client_indices]
        self.partition_hash = partition_hash(self.client_indices)
        self.batch_sizes = client_batch_sizes(args, self.client_sizes)
        self._warn_small_shards()
        steps = default_steps_per_epoch(self.client_indices, self.batch_sizes, args.client_sample_ratio)
        self.schedule = FederatedSchedule(self.client_indices, self.batch_sizes, args.client_sample_ratio, steps, args.seed)
        if runtime.is_distributed:
            check_clients_per_rank(self.schedule.pool_size, args.num_client, args.client_sample_ratio,
                                   runtime.world_size)
            if getattr(args, "server_update", "joint") != "joint":
                raise UserError("--server_update per_client steps the server once per client in pool order and "
                                "cannot be split over processes; run it as one process or use --server_update joint")
        self.loaders: FederatedLoaders = build_loaders(args, self.dataset, self.schedule, view_spec, runtime)
        self.steps_per_epoch = self.loaders.train.steps_per_epoch

    def _partition(self) -> list[np.ndarray]:
        args = self.args
        labels = self.dataset.train_labels
        if args.hetero and args.partition == "iid":
            indices = hetero_partition(len(labels), args.num_client, args.hetero_string, args.seed)
        else:
            indices = make_partition(labels, args.num_client, args.partition, self.dataset.num_classes,
                                     dirichlet_alpha=args.dirichlet_alpha, noniid_ratio=args.noniid_ratio,
                                     min_client_samples=args.min_client_samples, seed=args.seed)
        if self.runtime.is_main:
            save_partition(self.output_dir, labels, indices, self.dataset.num_classes,
                           extra={"partition": args.partition, "dirichlet_alpha": args.dirichlet_alpha,
                                  "noniid_ratio": args.noniid_ratio, "seed": args.seed, "hetero": args.hetero})
        return indices

    def _warn_small_shards(self) -> None:
        """Say when clients hold fewer samples than their batch: their batches repeat samples within a step."""
        # Not an error: a client reads its shard as an endless stream of reshuffled passes (there is no drop-last),
        # so a batch larger than the shard wraps around; each repeat is a new stream position with its own augmentation.
        small = [(size, batch) for size, batch in zip(self.client_sizes, self.batch_sizes) if size < batch]
        if small:
            size, batch = min(small)
            logger.warning(f"{len(small)} of {len(self.client_sizes)} clients hold fewer samples than their batch "
                           f"(smallest: {size} samples, batch {batch}); their batches repeat samples within a step")

    def _amp_dtype(self) -> torch.dtype | None:
        if not self.args.use_fp16:
            return None
        if not self.runtime.is_cuda:
            logger.warning("--use_fp16 needs CUDA: training in full precision on %s", self.device)
            return None
        return torch.bfloat16 if self.args.amp_dtype == "bf16" else torch.float16

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---------------------------------------------------------------------------------------------- training
    def set_learning_rates(self, epoch: int, step: int) -> tuple[float, float]:
        server_lr, client_lr = self.lr_schedule.rates(epoch, step)
        for group in self.server_optimizer.param_groups:
            group["lr"] = server_lr
        self.clients.set_lr(client_lr)
        return server_lr, client_lr

    def train_step(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One SFL step over the pool: clients forward, joint server loss, one backward, server and client steps."""
        method, clients, pool = self.method, self.clients, batch.client_ids
        crops = [crop.contiguous(memory_format=self.memory_format) for crop in batch.crops]
        scale_before = self._loss_scale() if self.scaler.is_enabled() else None
        self.server_optimizer.zero_grad(set_to_none=True)
        clients.zero_grad(pool)
        with self.autocast():
            smashed = clients.forward([crops[k] for k in method.trainable_crops], pool, batch.rows_per_client)
            server_inputs = [s.detach().requires_grad_(True) for s in smashed]
            momentum_smashed = (clients.momentum_forward([crops[k] for k in method.momentum_crops], pool,
                                                         batch.rows_per_client) if method.momentum_crops else [])
        world_size = self.runtime.world_size
        if getattr(self.args, "server_update", "joint") == "per_client":
            loss, stats = self._per_client_server_updates(server_inputs, momentum_smashed, batch.rows_per_client)
        else:
            with self.autocast():
                loss, stats = method.compute_loss(server_inputs, momentum_smashed, self.epoch)
            # DDP averages the server gradients over ranks; weighting each rank's mean loss by its share of the
            # step's rows (times the world size) makes that average the gradient of the global mean loss.
            backward_loss = loss * (world_size * self.row_share(batch)) if world_size > 1 else loss
            self.scaler.scale(backward_loss).backward()
            method.before_server_step(self.global_step)
            self.scaler.step(self.server_optimizer)
        gradients = [s.grad for s in server_inputs]
        if world_size > 1:
            # The smashed rows' gradients are not averaged by DDP: undo the world-size factor of the weight.
            gradients = [g / world_size if g is not None else None for g in gradients]
        clients.backward(gradients)
        clients.step(pool, self.scaler)
        if world_size > 1 and self.scaler.is_enabled():
            self._agree_on_overflow()
        self.scaler.update()
        if scale_before is not None:
            # The scaler lowers its scale exactly when some optimizer found inf/NaN gradients and skipped its step.
            self.skipped_steps += (self._loss_scale() < scale_before).long()
        method.after_server_step()
        if method.client_momentum > 0:
            clients.update_momentum_copies(pool, method.client_momentum)
        return loss.detach(), {name: value.detach() for name, value in stats.items()}

    def pool_rows(self, epoch: int) -> int:
        """Rows of one step of `epoch` over the whole pool (every rank's clients)."""
        if epoch not in self._pool_rows:
            self._pool_rows[epoch] = sum(self.batch_sizes[c] for c in self.loaders.train.pool(epoch))
        return self._pool_rows[epoch]

    def row_share(self, batch) -> float:
        """This process's fraction of the step's rows (1 in a single process)."""
        if not self.runtime.is_distributed:
            return 1.0
        return batch.num_rows / self.pool_rows(self.epoch)

    def own_clients(self, epoch: int) -> list[int]:
        """The clients of `epoch`'s pool this process trains (all of them in a single process)."""
        pool = self.loaders.train.pool(epoch)
        if not self.runtime.is_distributed:
            return pool
        return client_shares(pool, self.runtime.world_size)[self.runtime.rank]

    def _agree_on_overflow(self) -> None:
        """fp16 under torchrun: every rank lowers its loss scale when any rank's optimizers met inf/NaN."""
        states = getattr(self.scaler, "_per_optimizer_states", {})
        found = [flag for state in states.values() for flag in state.get("found_inf_per_device", {}).values()]
        local = (torch.stack([flag.to(self.device).float().sum() for flag in found]).sum() if found
                 else torch.zeros((), device=self.device)).reshape(1)
        torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
        server_flags = states.get(id(self.server_optimizer), {}).get("found_inf_per_device", {})
        for flag in server_flags.values():
            flag.copy_(torch.maximum(flag, (local > 0).to(flag.dtype).to(flag.device).reshape(flag.shape)))
            break

    def _loss_scale(self) -> torch.Tensor:
        """The GradScaler's current scale as a device tensor (a copy), read without a host synchronisation."""
        scale = getattr(self.scaler, "_scale", None)
        if isinstance(scale, torch.Tensor):
            return scale.detach().clone()
        # Before its first step the scaler has no tensor yet; its scale is then the initial one (no sync either).
        return torch.tensor(self.scaler.get_scale(), dtype=torch.float32, device=self.device)

    def _per_client_server_updates(self, server_inputs: list[torch.Tensor], momentum_smashed: list[torch.Tensor],
                                   rows_per_client: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The seed's 2023-07-27 variant (ablation): one loss and one server step per client, in pool order."""
        offsets = query_index(rows_per_client)
        losses = []
        stats: dict[str, torch.Tensor] = {}
        for j in range(len(rows_per_client)):
            rows = slice(offsets[j], offsets[j + 1])
            self.server_optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                loss, stats = self.method.compute_loss([x[rows] for x in server_inputs],
                                                       [x[rows] for x in momentum_smashed], self.epoch)
            loss.backward()  # gradient rows of this client accumulate into server_inputs[k].grad[rows]
            self.method.before_server_step(self.global_step)
            self.server_optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean(), stats

    def fedavg(self, pool: Sequence[int]) -> None:
        """FedAvg of the pool's clients weighted by data size, loaded into every client (over all ranks)."""
        include_momentum = getattr(self.args, "fedavg_momentum", False)
        if not self.runtime.is_distributed:
            self.clients.fedavg(pool, [self.client_sizes[c] for c in pool], include_momentum_copies=include_momentum)
            return
        self.clients.set_every_client(self.global_average(pool))
        if include_momentum and self.method.client_momentum > 0:
            self.clients.set_every_client(self.global_average(pool, momentum_copies=True), momentum_copies=True)

    def global_average(self, pool: Sequence[int], momentum_copies: bool = False) -> dict[str, torch.Tensor]:
        """Data-size weighted average of the pool's clients: each rank sums its own share, then one all-reduce."""
        own = client_shares(pool, self.runtime.world_size)[self.runtime.rank]
        total = float(sum(self.client_sizes[c] for c in pool))
        partial = self.clients.averaged_state(own, [self.client_sizes[c] for c in own], momentum_copies=momentum_copies,
                                              total=total, dtype=torch.float64)
        for value in partial.values():
            if value.is_floating_point():
                all_reduce_sum(value)
        return partial

    def share_client_states(self, client_ids: Sequence[int]) -> None:
        """Give every rank the current state of these clients (from the rank that trained them last)."""
        by_source: dict[int, list[int]] = {}
        for client in client_ids:
            if self.client_holder[client] >= 0:
                by_source.setdefault(int(self.client_holder[client]), []).append(int(client))
        if not by_source:
            return
        full: dict | None = None
        for source in sorted(by_source):  # the same order on every rank: holders are known everywhere
            ids = by_source[source]
            payload = None
            if self.runtime.rank == source:
                states = self.clients.state_dict()
                payload = {key: [_to_cpu(states[key][c]) for c in ids] if states[key] else []
                           for key in ("models", "momentum_models", "optimizers")}
            payload = broadcast_object(payload, source, self.device)
            if self.runtime.rank != source:
                full = full if full is not None else self.clients.state_dict()
                for key, values in payload.items():
                    for client, value in zip(ids, values):
                        full[key][client] = value
            self.client_holder[ids] = -1
        if full is not None:
            self.clients.load_state_dict(full)

    def hand_over_clients(self, epoch: int) -> None:
        """Before `epoch`: clients that change rank get their state from the last one; mark the new holders."""
        pool = self.loaders.train.pool(epoch)
        shares = client_shares(pool, self.runtime.world_size)
        owner = {client: rank for rank, share in enumerate(shares) for client in share}
        moving = [c for c in pool if self.client_holder[c] not in (-1, owner[c])]
        self.share_client_states(moving)
        for client, rank in owner.items():
            self.client_holder[client] = rank

    def stopping(self) -> bool:
        """Whether to stop: the signal itself in one process; under torchrun the decision all ranks agreed on."""
        return self._agreed_stop if self.runtime.is_distributed else self.stop.requested

    def agree_on_stop(self) -> None:
        """Under torchrun: stop when any rank got a signal (all ranks must leave the loop at the same step)."""
        if self.runtime.is_distributed:
            self._agreed_stop = all_reduce_max_flag(self.stop.requested or self._agreed_stop, self.device)

    def train(self) -> None:
        """Run epochs until --num_epoch or --max_steps; on a stop signal save and raise TrainingInterrupted."""
        args = self.args
        total_epochs = args.num_epoch
        self.agree_on_stop()
        if self.global_step == 0 and args.eval_freq > 0 and not self.stopping():
            self.log_knn(0)
        while self.epoch < total_epochs and not self.reached_max_steps() and not self.stopping():
            self.train_epoch()
            self.agree_on_stop()
            if self.step_in_epoch == 0:  # the epoch finished (not cut by --max_steps or a signal)
                completed = self.epoch
                if args.eval_freq > 0 and completed % args.eval_freq == 0:
                    if self.stopping():  # save first: a scheduler's grace period may be short
                        logger.info(f"{self.stop.name or 'stop'}: skipping the kNN monitor of epoch {completed}")
                    else:
                        self.log_knn(completed)
                if not self.stopping():
                    self.save_checkpoint()
        self.save_checkpoint()
        if self.stopping():
            self.interrupted()

    def interrupted(self) -> None:
        """Log and raise the stop of a signalled run (its checkpoint is saved); the message says how to resume."""
        message = (f"{self.stop.name or 'a stop signal (on another rank)'} received: stopped after step {self.global_step} (epoch {self.epoch + 1}, "
                   f"step {self.step_in_epoch} of {self.steps_per_epoch}) and saved {self.output_dir / CHECKPOINT_NAME}; "
                   f"resume with: {resume_command(self.args)}")
        if self.runtime.is_main:  # every rank stops; one says so
            logger.warning(message)
        raise TrainingInterrupted(message, int(self.stop.signal_number or signal.SIGTERM), announce=self.runtime.is_main)

    def reached_max_steps(self) -> bool:
        """Whether --max_steps (when set) is reached."""
        return self.args.max_steps > 0 and self.global_step >= self.args.max_steps

    def train_epoch(self) -> None:
        """Train the rest of the current epoch, or up to --max_steps, or until a stop signal (after a whole step)."""
        from tqdm import tqdm

        args, epoch = self.args, self.epoch
        pool = self.loaders.train.pool(epoch)
        if self.runtime.is_distributed:
            self.hand_over_clients(epoch)
        self.method.start_epoch(epoch)
        self.method.train()
        avg_after = fedavg_positions(self.steps_per_epoch, args.avg_freq)
        window = LogWindow()
        stat_sums: dict[str, torch.Tensor] = {}
        stat_count = 0
        # A bar on a terminal; redirected to a file (Slurm, nohup) its carriage returns would garble the log, so
        # _log_window prints a plain line per log point instead.
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {epoch + 1}/{args.num_epoch}",
                   disable=not (self.runtime.is_main and sys.stdout.isatty()), dynamic_ncols=True, leave=False,
                   file=sys.stdout)
        first = True
        own = self.own_clients(epoch)
        batches = iter(self.loaders.train.epoch(epoch, start_step=self.step_in_epoch,
                                                clients=own if self.runtime.is_distributed else None))
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
                if first or getattr(args, "use_swav_scheduler", False):
                    window.server_lr, window.client_lr = self.set_learning_rates(epoch, step)
                    first = False
                batch = batch.to(self.device)
                loss, stats = self.train_step(batch)
                share = self.row_share(batch)
                self.global_step += 1
                self.step_in_epoch += 1
                # Under torchrun each rank logs its row-weighted part; the sum over ranks is the global loss.
                window.losses.append((self.global_step, loss * share if self.runtime.is_distributed else loss))
                window.images += self.pool_rows(epoch)
                for name, value in stats.items():
                    stat_sums[name] = stat_sums.get(name, 0.0) + value * share
                stat_count += 1
                if step in avg_after:
                    self.fedavg(pool)
                bar.update(1)
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
        if self.runtime.is_distributed and stat_sums:
            names = sorted(stat_sums)
            reduced = all_reduce_sum(torch.stack([torch.as_tensor(stat_sums[n], device=self.device).float()
                                                  for n in names]))
            stat_sums = dict(zip(names, reduced.unbind()))
        epoch_stats = {name: float(value) / max(1, stat_count) for name, value in stat_sums.items()}
        epoch_stats.update(self.method.epoch_summary())
        recent = [loss for _, loss in self.metrics.data["train_loss"][-stat_count:]] if stat_count else [float("nan")]
        summary = f"epoch {epoch + 1}: loss {np.mean(recent):.4f}, lr {window.server_lr:.4g}, step {self.global_step}"
        if self.scaler.is_enabled():
            summary += f", skipped_steps {int(self.skipped_steps)}"
        for name, value in epoch_stats.items():
            self.metrics.append(name, epoch + 1, value)
            self.tensorboard.scalar(f"train/{name}", value, epoch + 1)
            summary += f", {name} {value:.4g}"
        logger.info(summary)
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        self.metrics.save()

    def _log_window(self, window: "LogWindow", bar: Any) -> None:
        """Check and log the losses of the steps since the last log point (one host transfer)."""
        elapsed = time.perf_counter() - window.start
        images_per_sec = window.images / max(elapsed, 1e-9)
        losses = self._flush_losses(window.losses)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{window.server_lr:.4g}", img_s=f"{images_per_sec:.0f}")
        if bar.disable and self.runtime.is_main:
            print(f"epoch {self.epoch + 1}/{self.args.num_epoch} step {self.step_in_epoch}/{self.steps_per_epoch}: "
                  f"loss {losses[-1]:.4f}, lr {window.server_lr:.4g}, {images_per_sec:.0f} img/s", flush=True)
        self.tensorboard.scalar("train/loss", losses[-1], self.global_step)
        self.tensorboard.scalar("train/lr", window.server_lr, self.global_step)
        self.tensorboard.scalar("train/client_lr", window.client_lr, self.global_step)
        self.tensorboard.scalar("train/images_per_sec", images_per_sec, self.global_step)
        if self.scaler.is_enabled():
            self._log_loss_scale()
        window.start, window.images = time.perf_counter(), 0
        self.agree_on_stop()

    def _log_loss_scale(self) -> None:
        """fp16: log the skipped-step count and the loss scale; stop when the scale shows the run diverged."""
        skipped, scale = int(self.skipped_steps), float(self.scaler.get_scale())
        self.metrics.append("skipped_steps", self.global_step, skipped)
        self.tensorboard.scalar("train/skipped_steps", skipped, self.global_step)
        self.tensorboard.scalar("train/loss_scale", scale, self.global_step)
        if scale < MIN_LOSS_SCALE:
            raise UserError(f"the fp16 loss scale fell to {scale:.3g} by step {self.global_step} ({skipped} steps "
                            f"skipped): gradients overflow even unscaled; {self._last_good_checkpoint()} "
                            "(try a lower --lr or --amp_dtype bf16)")

    def _flush_losses(self, pending: list[tuple[int, torch.Tensor]]) -> list[float]:
        """Move the logged losses to the host in one transfer (no per-step synchronisation) and check them."""
        stacked = torch.stack([loss.float() for _, loss in pending])
        if self.runtime.is_distributed:
            all_reduce_sum(stacked)  # one collective per log window: the global losses, identical on every rank
        values = stacked.cpu().tolist()
        for (step, _), value in zip(pending, values):
            if math.isfinite(value):
                self.metrics.append("train_loss", step, value)
            elif not self.scaler.is_enabled():
                raise UserError(f"the loss became {value} at step {step}; stopped without saving that state; "
                                f"{self._last_good_checkpoint()} (try a lower --lr)")
            # With fp16 loss scaling a non-finite loss means the scaler skipped that update: counted, not fatal.
        pending.clear()
        return values

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
        """Flush and close the tensorboard writer (safe to call twice)."""
        self.tensorboard.close()

    def evaluation_encoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Averaged client model followed by the server's backbone, in eval mode."""
        pool = self.loaders.train.pool(min(self.epoch, self.args.num_epoch - 1))
        if self.runtime.is_distributed:
            # Every rank evaluates the same averaged model (only rank 0 writes), so no rank waits on another.
            client_model = self.clients.averaged_model(pool[:1], [1.0])
            reference = client_model.state_dict()
            client_model.load_state_dict({name: value.to(reference[name].dtype)
                                          for name, value in self.global_average(pool).items()})
            client_model.eval()
        else:
            client_model = self.clients.averaged_model(pool, [self.client_sizes[c] for c in pool]).eval()
        method = self.method.eval()

        def encode(images: torch.Tensor) -> torch.Tensor:
            return method.encode_features(client_model(images))

        return encode

    def features(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        encode = self.evaluation_encoder()
        train_features, train_labels = extract_features(encode, self.loaders.memory, self.device)
        test_features, test_labels = extract_features(encode, self.loaders.test, self.device)
        self.method.train()
        return train_features, train_labels, test_features, test_labels

    def log_knn(self, epoch: int) -> float:
        train_features, train_labels, test_features, test_labels = self.features()
        accuracy = knn_accuracy(train_features, train_labels, test_features, test_labels, self.dataset.num_classes,
                                k=self.args.knn_k, temperature=self.args.knn_t)
        logger.info(f"kNN accuracy after epoch {epoch}: {accuracy:.2f} %")
        self.metrics.append("knn_acc", epoch, accuracy)
        self.tensorboard.scalar("eval/knn_acc", accuracy, epoch)
        self.metrics.save()
        return accuracy

    def final_evaluation(self) -> dict[str, float]:
        args = self.args
        train_features, train_labels, test_features, test_labels = self.features()
        num_classes = self.dataset.num_classes
        results: dict[str, Any] = {
            "knn_acc": knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes,
                                    k=args.knn_k, temperature=args.knn_t),
            "step": self.global_step,
            "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
        }
        if not args.skip_linear:
            probe = linear_probe(train_features, train_labels, test_features, test_labels, num_classes,
                                 epochs=args.linear_epochs, seed=args.seed, device=self.device)
            results["linear_acc"] = probe["test_acc"]
            results.update(semi_supervised_probes(train_features, train_labels, test_features, test_labels,
                                                  num_classes, epochs=args.linear_epochs, seed=args.seed,
                                                  device=self.device))
        else:
            results["linear_acc"] = None
        self.metrics.data["final"] = results
        self.metrics.save()
        described = ", ".join(f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
                              for key, value in results.items())
        logger.info(f"final evaluation: {described}")
        for key, value in results.items():
            if isinstance(value, float):
                self.tensorboard.scalar(f"final/{key}", value, self.global_step)
        return results

    # ------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "args": vars(self.args).copy(),
            "signature": training_signature(self.args),
            "partition_hash": self.partition_hash,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "method": self.method.state_dict(), "method_extra": self.method.extra_state(),
            "clients": self.clients.state_dict(),
            "server_optimizer": self.server_optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "skipped_steps": int(self.skipped_steps),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "metrics": self.metrics.data,
        }

    def save_checkpoint(self) -> None:
        """Write checkpoint_last.pt atomically; refuse (keeping the previous file) when the weights are not finite.

        Under torchrun every rank calls it: clients trained on other ranks send their state first, then every
        rank checks the same state (so all stop together on a non-finite one) and rank 0 writes.
        """
        if self.runtime.is_distributed:
            self.share_client_states(range(self.args.num_client))
        state = self.state_dict()
        broken = first_non_finite({key: state[key] for key in ("method", "method_extra", "clients", "server_optimizer")})
        if broken is not None:
            if not self.runtime.is_main:
                raise UserError(f"{broken} became non-finite by step {self.global_step}; stopped without saving")
            raise UserError(f"{broken} became non-finite by step {self.global_step}; stopped without saving that "
                            f"state; {self._last_good_checkpoint()} (try a lower --lr)")
        path = self.output_dir / CHECKPOINT_NAME
        # Agreed: when rank 0 cannot write (a full disk), every rank stops with its one line instead of hanging.
        run_agreed(lambda: save_atomic(state, path) if self.runtime.is_main else None)
        self.saved_step = self.global_step

    def load_state_dict(self, state: dict[str, Any], check_signature: bool = True,
                        source: str = "the checkpoint") -> None:
        """Continue from a checkpoint: weights, optimizers, queues, position in the schedule, RNG and metrics."""
        missing = sorted(CHECKPOINT_KEYS - set(state))
        if missing:
            raise UserError(f"{source} is incomplete (no {', '.join(missing)}); delete it or pass another --output_dir")
        if state["format"] != CHECKPOINT_FORMAT:
            raise UserError(f"{source} has format {state['format']!r}, this version reads format {CHECKPOINT_FORMAT}; "
                            "evaluate or resume it with the version that wrote it")
        if check_signature:
            check_same_configuration(state, self.args, self.partition_hash)
        try:
            self.method.load_state_dict(state["method"])
            self.method.load_extra_state(state["method_extra"])
            self.clients.load_state_dict(state["clients"])
            self.server_optimizer.load_state_dict(state["server_optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
            reason = " ".join(str(error).split())[:200] or type(error).__name__
            raise UserError(f"{source} does not fit this run ({reason}); delete it or pass another --output_dir") from None
        self.skipped_steps.fill_(int(state.get("skipped_steps", 0)))
        self.client_holder.fill(-1)  # every rank loaded every client's state
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        header = {key: self.metrics.data[key] for key in ("data_backend", "world_size")}
        self.metrics.data = {**state["metrics"], **header}


def _to_cpu(tree: Any) -> Any:
    """The same nested dicts/lists with every tensor copied to the CPU (to send it to other ranks)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {key: _to_cpu(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_to_cpu(value) for value in tree] if isinstance(tree, list) else tuple(_to_cpu(v) for v in tree)
    return tree


def first_non_finite(tree: Any, name: str = "") -> str | None:
    """Name of the first floating tensor holding inf or NaN in nested dicts/lists/tuples, or None."""
    named: list[tuple[str, torch.Tensor]] = []

    def collect(node: Any, path: str) -> None:
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() or node.is_complex():
                named.append((path, node))
        elif isinstance(node, dict):
            for key, value in node.items():
                collect(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                collect(value, f"{path}[{index}]")

    collect(tree, name)
    positions_by_device: dict[torch.device, list[int]] = {}
    for position, (_, tensor) in enumerate(named):
        positions_by_device.setdefault(tensor.device, []).append(position)
    finite = [True] * len(named)
    for positions in positions_by_device.values():  # one host transfer per device
        flags = torch.stack([named[p][1].isfinite().all() for p in positions]).cpu().tolist()
        for position, flag in zip(positions, flags):
            finite[position] = flag
    return next((path for (path, _), ok in zip(named, finite) if not ok), None)


def check_same_configuration(state: dict[str, Any], args: argparse.Namespace, current_hash: str) -> None:
    """Refuse to resume a checkpoint made under different training options (names the first difference)."""
    saved = state["signature"]
    current = training_signature(args)
    differing = [key for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if differing:
        was = " ".join(f"--{key} {saved.get(key)!r}" for key in differing)
        now = " ".join(f"--{key} {current.get(key)!r}" for key in differing)
        raise UserError(f"the checkpoint in {args.output_dir} was made with {was}, this run has {now}; "
                        "use the same options, or a new --output_dir")
    if state["partition_hash"] != current_hash:
        raise UserError(f"the checkpoint in {args.output_dir} was made on a different data partition; "
                        "use the same data and partition options, or a new --output_dir")


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of build_split_resnet for this run."""
    options: dict[str, Any] = dict(arch=args.arch, cutlayer=args.cutlayer, use_ws=not args.disable_WS,
                                   client_residual=not args.disable_c_residual, width=args.width)
    if args.method == "moco":
        options.update(head="moco", moco_version=args.moco_version, K_dim=args.K_dim)
    else:
        options.update(head="swav", hidden_mlp=args.hidden_mlp, feat_dim=args.feat_dim,
                       nmb_prototypes=args.nmb_prototypes)
    return options


def build_loaders(args: argparse.Namespace, dataset: ImageDataset, schedule: FederatedSchedule, view_spec: ViewSpec,
                  runtime: Runtime) -> FederatedLoaders:
    """The torch (torchvision) or DALI data path; both return the same FederatedLoaders contract."""
    if args.use_dali:
        try:
            from Dali.get_dali_dataloader import build_dali_loaders
        except ImportError as error:
            if "nvidia" not in str(error):
                raise
            raise UserError("--use_dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or drop --use_dali)") from None
        return build_dali_loaders(dataset, schedule, view_spec, device=runtime.device, dali_device=args.dali_device,
                                  eval_batch_size=args.eval_batch_size, num_threads=max(1, args.num_workers),
                                  seed=args.seed)
    from multicropdataset import build_torch_loaders, multicrop_transforms

    transforms = multicrop_transforms(dataset.mean, dataset.std, list(view_spec.nmb_crops), list(view_spec.size_crops),
                                      list(view_spec.min_scale_crops), list(view_spec.max_scale_crops))
    return build_torch_loaders(dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels,
                               dataset.mean, dataset.std, schedule, transforms, eval_batch_size=args.eval_batch_size,
                               num_workers=args.num_workers, device=runtime.device)


# ------------------------------------------------------------------------------------------------ entry point
def run(args: argparse.Namespace, build_method: MethodFactory, view_spec: ViewSpec) -> dict[str, Any]:
    """Train (or resume, or only evaluate) one run and return its final results (every rank, under torchrun)."""
    world_size = planned_world_size()
    if world_size > 1:  # before joining the process group: a run that cannot be split fails at once, on every rank
        check_clients_per_rank(pool_size_of(args.num_client, args.client_sample_ratio), args.num_client,
                               args.client_sample_ratio, world_size)
    runtime = setup_runtime(args.device)
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)  # off by default: reproducible convolutions
    try:
        return _run_on(runtime, args, build_method, view_spec)
    finally:
        shutdown_runtime(runtime)


def starting_state(args: argparse.Namespace, runtime: Runtime, checkpoint_path: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from (None for a new run), decided by rank 0 and the same on every rank.

    Ranks that see the file read it themselves (a shared file system); when some do not (nodes with their own
    disks), rank 0 sends its copy. A refusal is raised on every rank, so no rank is left waiting for the others.
    """
    problem: str | None = None
    if runtime.is_main:
        if not args.resume and checkpoint_path.exists():
            problem = f"{checkpoint_path} exists: add --resume to continue that run, or choose a new --output_dir"
        elif args.resume and not checkpoint_path.exists():
            problem = f"--resume: no {CHECKPOINT_NAME} in {checkpoint_path.parent}; run without --resume to start"
    if not runtime.is_distributed:
        if problem:
            raise UserError(problem)
        return load_checkpoint(checkpoint_path) if args.resume else None
    problem = broadcast_object(problem, 0, runtime.device)
    if problem:
        raise UserError(problem)
    if not args.resume:
        return None
    if not all_reduce_max_flag(not checkpoint_path.exists(), runtime.device):
        return load_checkpoint(checkpoint_path)
    state: dict[str, Any] | None = None
    if runtime.is_main:
        try:
            state = load_checkpoint(checkpoint_path)
        except UserError as error:
            problem = str(error)
    problem, state = broadcast_object((problem, state), 0, runtime.device)
    if problem:
        raise UserError(problem)
    return state


def _run_on(runtime: Runtime, args: argparse.Namespace, build_method: MethodFactory,
            view_spec: ViewSpec) -> dict[str, Any]:
    """run() once the process knows its rank and device."""
    if args.eval_only:
        return evaluate_checkpoint(args, build_method, view_spec, runtime)
    output_dir = run_agreed(lambda: prepare_output_dir(args.output_dir))
    setup_logging(output_dir, runtime.is_main)
    checkpoint_path = output_dir / CHECKPOINT_NAME
    state = starting_state(args, runtime, checkpoint_path)  # a bad file is refused before anything changes
    if runtime.is_main:
        for leftover in remove_stale_temporaries(checkpoint_path):
            logger.info(f"removed {leftover.name}, left by a save that was killed before it completed")
    run_agreed(lambda: save_resolved_config(args, output_dir / "config.yaml") if runtime.is_main else None)
    trainer = Trainer(args, build_method, view_spec, runtime, output_dir)
    try:
        logger.info(f"{args.method}: {args.num_client} clients, {trainer.steps_per_epoch} steps per epoch, "
                    f"device {runtime.device}, data {trainer.loaders.backend}, output {output_dir}")
        if state is not None:
            trainer.load_state_dict(state, source=str(checkpoint_path))
            logger.info(f"resumed from {checkpoint_path} at epoch {trainer.epoch + 1}, step {trainer.global_step}")
        # While training, SIGTERM/SIGINT end the current step, save the checkpoint and exit with the resume command.
        # Outside it (data loading, final evaluation) they act as usual: there is nothing new to save.
        with trainer.stop:
            trainer.train()
        results = trainer.final_evaluation()
        trainer.save_checkpoint()
    finally:
        trainer.close()
    return results


def evaluate_checkpoint(args: argparse.Namespace, build_method: MethodFactory, view_spec: ViewSpec,
                        runtime: Runtime) -> dict[str, Any]:
    """--eval_only: rebuild the run a checkpoint came from and run the final evaluation on it."""
    state = load_checkpoint(args.checkpoint)
    if not isinstance(state.get("args"), dict):
        raise UserError(f"{args.checkpoint} is incomplete (no args); pass a checkpoint_last.pt written by a training run")
    saved = argparse.Namespace(**state["args"])
    saved.data_dir, saved.device, saved.num_workers = args.data_dir, args.device, args.num_workers
    saved.linear_epochs, saved.skip_linear, saved.eval_batch_size = args.linear_epochs, args.skip_linear, args.eval_batch_size
    output_dir = prepare_output_dir(str(Path(args.checkpoint).resolve().parent / "eval_only"))
    setup_logging(output_dir, runtime.is_main)
    trainer = Trainer(saved, build_method, view_spec, runtime, output_dir)
    trainer.load_state_dict(state, check_signature=False, source=str(args.checkpoint))
    try:
        return trainer.final_evaluation()
    finally:
        trainer.close()
