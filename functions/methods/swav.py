"""SwAV on the server side of split federated learning: Sinkhorn codes, swapped prediction, metrics, queue.

The top of this module holds pure functions and small state classes that follow Caron et al. (SwAV):
Sinkhorn-Knopp equipartition in float32 (optionally global over all ranks), the swapped prediction loss,
collapse monitors, prototype normalisation and the per-crop embedding queue.
"""
from __future__ import annotations

import argparse
import math
from functools import partial
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from functions.core.compat import mocosfl_compat
from functions.core.distributed import all_gather_rows, all_reduce_sum
from functions.core.errors import UserError, check_range
from functions.data.datasets import DatasetEntry, resolved_entry
from functions.data.views import ViewSpec
from functions.losses.swav import (
    EmbeddingQueue,
    code_entropy,
    embedding_std,
    prototypes_used,
    resolution_groups,
    seed_fork_accumulated_loss,
    sinkhorn_knopp,
    swapped_prediction_loss,
)
from functions.methods.base import ServerMethod, StepContext
from functions.methods.heads import MAX_HEAD_DIM, MAX_QUEUE_KEYS, MOCO_VERSIONS, build_moco_head, build_swav_head
from functions.methods.registry import register_method
from functions.methods.schedules import LearningRateSchedule
from models.layers import L2Normalize
from models.split import Head, HeadBuilder, architecture


@torch.no_grad()
def normalize_prototypes_(prototypes: nn.Linear) -> None:
    """L2-normalise each prototype vector in place."""
    prototypes.weight.copy_(F.normalize(prototypes.weight, dim=1))


# ------------------------------------------------------------------------------------------ the server method


@torch.no_grad()
def _global_monitor_values(codes: Tensor, embeddings: Tensor) -> dict[str, Tensor]:
    """code_entropy, prototypes_used and embedding_std over every rank's rows (one all-reduce)."""
    codes = codes.detach().float()
    unit = F.normalize(embeddings.detach().float(), dim=1)
    entropy_sum = -torch.xlogy(codes, codes).sum()
    winners = torch.bincount(codes.argmax(dim=1), minlength=codes.shape[1]).float()
    rows = torch.tensor([float(codes.shape[0])], device=codes.device)
    totals = all_reduce_sum(torch.cat([entropy_sum.reshape(1), rows, winners, unit.sum(0), (unit * unit).sum(0)]))
    num_prototypes, dim = codes.shape[1], unit.shape[1]
    entropy_total, count = totals[0], totals[1]
    used = (totals[2:2 + num_prototypes] > 0).sum().float()
    first, second = totals[2 + num_prototypes:2 + num_prototypes + dim], totals[2 + num_prototypes + dim:]
    variance = (second - first * first / count).clamp_min(0) / (count - 1).clamp_min(1)  # unbiased, as embedding_std
    return {"code_entropy": entropy_total / count, "prototypes_used": used, "embedding_std": variance.sqrt().mean()}


class SwavWarmupCosine(LearningRateSchedule):
    """SwAV's schedule (--use_swav_scheduler): linear warm-up from --start_warmup, then per-step cosine to the
    final rates (--final_s_lr, --final_c_lr)."""

    per_step = True

    @property
    def depends_on_num_epoch(self) -> bool:
        return True

    def rates(self, epoch: int, step: int) -> tuple[float, float]:
        args = self.args
        return (self._warmup_cosine(args.lr, args.final_s_lr, epoch, step),
                self._warmup_cosine(args.c_lr, args.final_c_lr, epoch, step))

    def _warmup_cosine(self, base: float, final: float, epoch: int, step: int) -> float:
        """The rate of one side at (epoch, step)."""
        iteration = epoch * self.steps_per_epoch + step
        warmup = self.args.warmup_epochs * self.steps_per_epoch
        if iteration < warmup:
            # np.linspace(start, base, warmup) as SwAV: the last warm-up step already reaches the base rate.
            return self.args.start_warmup + (base - self.args.start_warmup) * iteration / max(1, warmup - 1)
        total = max(1, self.args.num_epoch * self.steps_per_epoch - warmup)
        progress = min(1.0, (iteration - warmup) / total)
        return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


@register_method("swav", entry_script="run_sflswav.py", description="SwAV (multi-crop, prototypes, Sinkhorn)")
class SwavServer(ServerMethod):
    """SwAV's server side: projection head, prototypes, Sinkhorn codes over ALL clients' rows, swapped prediction.

    Rows arrive crop-major (crop 0 of every client, then crop 1, ...), the same image order in every crop, so
    crop v's scores and crop i's codes line up row by row across the whole stacked batch.
    """

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        swav = parser.add_argument_group("SwAV")
        swav.add_argument("--nmb_crops", type=int, nargs="+", default=[2, 6], help="number of crops of each size")
        swav.add_argument("--size_crops", type=int, nargs="+", default=None,
                          help="crop sizes in pixels (default: the dataset's global and local sizes, 32 16 on CIFAR)")
        swav.add_argument("--min_scale_crops", type=float, nargs="+", default=[0.2, 0.08],
                          help="RandomResizedCrop minimum area fraction per size")
        swav.add_argument("--max_scale_crops", type=float, nargs="+", default=[1.0, 0.3],
                          help="RandomResizedCrop maximum area fraction per size")
        swav.add_argument("--crops_for_assign", type=int, nargs="+", default=[0, 1], help="crops whose codes are predicted")
        swav.add_argument("--temperature", type=float, default=0.1, help="softmax temperature of the swapped prediction")
        swav.add_argument("--epsilon", type=float, default=0.03, help="entropy regularisation of Sinkhorn-Knopp")
        swav.add_argument("--sinkhorn_iterations", type=int, default=3, help="Sinkhorn-Knopp iterations")
        swav.add_argument("--feat_dim", type=int, default=128, help="embedding dimension")
        swav.add_argument("--hidden_mlp", type=int, default=2048, help="hidden width of the projection MLP (0 = linear)")
        swav.add_argument("--nmb_prototypes", type=int, default=300,
                          help="number of prototypes; keep about two rows of the global batch (plus queue) per prototype")
        swav.add_argument("--queue_length", type=int, default=0,
                          help="embeddings kept per assignment crop for Sinkhorn (0 = no queue)")
        swav.add_argument("--epoch_queue_starts", type=int, default=15, help="epoch from which the queue is filled and used")
        swav.add_argument("--freeze_prototypes_niters", type=int, default=80, help="steps during which the prototypes do not move")
        swav.add_argument("--server_update", type=str, default="joint", choices=["joint", "per_client"],
                          help="joint: one loss over all clients, one server step; per_client: one server step per client")
        swav.add_argument("--use_swav_scheduler", action="store_true",
                          help="linear warm-up then per-step cosine decay (SwAV's schedule) instead of --cos / milestones")
        swav.add_argument("--start_warmup", type=float, default=0.0, help="lr at the start of the warm-up")
        swav.add_argument("--warmup_epochs", type=int, default=10, help="warm-up epochs of --use_swav_scheduler")
        swav.add_argument("--final_s_lr", type=float, default=0.0006, help="server lr at the end of --use_swav_scheduler")
        swav.add_argument("--final_c_lr", type=float, default=-1.0,
                          help="client lr at the end of --use_swav_scheduler (-1 = same as --final_s_lr)")
        seed = parser.add_argument_group("SwAV with the seed's options (its head and queue were MoCo's)")
        seed.add_argument("--aug_type", type=str, default="swav", choices=["swav"], help="the seed's multi-crop views")
        seed.add_argument("--K", type=int, default=None,
                          help="the seed's name for the queue: with --queue_length 0, the queue holds --K embeddings")
        seed.add_argument("--moco_version", type=str, default=None, choices=list(MOCO_VERSIONS),
                          help="the seed's head: MocoSFL's projection head of this version (K_dim outputs, then the "
                               "prototypes) instead of --hidden_mlp / --feat_dim")
        seed.add_argument("--K_dim", type=int, default=None, help="with --moco_version: the embedding dimension "
                                                                  "(default: the version's)")
        seed.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=None,
                          help="with --moco_version: its MLP head (default: the version's)")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.scheme != "sfl":
            raise UserError("--scheme fl is MocoSFL's FL-MoCo baseline: run it with run_sflmoco.py")
        # SwAV keeps a constant rate without --milestones (MoCo's default is MocoSFL's milestones).
        args.milestones = [] if args.milestones is None else args.milestones
        args.c_gamma = 0.1 if args.c_gamma is None else args.c_gamma
        if args.moco_version is not None:
            version = MOCO_VERSIONS[args.moco_version]
            args.K_dim = version.K_dim if args.K_dim is None else args.K_dim
            args.mlp = version.mlp if args.mlp is None else args.mlp
        elif args.K_dim is not None or args.mlp is not None:
            raise UserError("--K_dim and --mlp shape the seed's MoCo-style SwAV head: add --moco_version")
        if args.K is not None and args.queue_length == 0:
            args.queue_length = args.K
        dataset = resolved_entry(args.dataset, args.data_size)
        if args.size_crops is None:
            args.size_crops = list(dataset.crop_sizes)
        total_crops = cls.view_spec(args, dataset).total_crops  # checks the crop lists
        if total_crops < 2:
            raise UserError("SwAV needs at least two crops in total (--nmb_crops)")
        for crop in args.crops_for_assign:
            if not 0 <= crop < total_crops:
                raise UserError(f"--crops_for_assign {crop} is out of range: there are {total_crops} crops "
                                f"(0..{total_crops - 1})")
        if len(set(args.crops_for_assign)) != len(args.crops_for_assign):
            raise UserError("--crops_for_assign lists a crop twice")
        if args.nmb_prototypes < 2:
            raise UserError("--nmb_prototypes must be at least 2")
        if args.queue_length < 0 or args.epsilon <= 0 or args.temperature <= 0 or args.sinkhorn_iterations < 1:
            raise UserError("--queue_length must be >= 0; --epsilon, --temperature and --sinkhorn_iterations positive")
        for name, interval in (("freeze_prototypes_niters", "[0, inf)"), ("epoch_queue_starts", "[0, inf)"),
                               ("feat_dim", f"[1, {MAX_HEAD_DIM}]"), ("hidden_mlp", f"[0, {MAX_HEAD_DIM}]"),
                               ("nmb_prototypes", f"[2, {MAX_HEAD_DIM}]"), ("queue_length", f"[0, {MAX_QUEUE_KEYS}]")):
            check_range(name, getattr(args, name), interval)
        if args.use_swav_scheduler:
            for name, interval in (("final_s_lr", "[0, inf)"), ("start_warmup", "[0, inf)"),
                                   ("warmup_epochs", f"[0, {args.num_epoch}]")):
                check_range(name, getattr(args, name), interval)
            if args.final_c_lr != -1.0:
                check_range("final_c_lr", args.final_c_lr, "[0, inf)")
        if args.server_update == "per_client" and args.use_fp16 and args.amp_dtype == "fp16":
            raise UserError("--server_update per_client steps the server once per client and cannot share fp16 loss "
                            "scaling with the clients; use --amp_dtype bf16 or --server_update joint")
        if args.final_c_lr == -1.0:
            args.final_c_lr = args.final_s_lr
        if mocosfl_compat(args) and args.server_update == "per_client":
            raise UserError("--compat mocosfl reproduces the seed fork's joint SwAV step; drop --server_update per_client")

    @classmethod
    def head_builder(cls, args: argparse.Namespace) -> HeadBuilder:
        if args.moco_version is not None:
            moco_head = partial(build_moco_head, moco_version=args.moco_version, K_dim=args.K_dim, mlp=args.mlp,
                                expansion=architecture(args.arch).expansion)
            return lambda feature_dim: Head(nn.Sequential(moco_head(feature_dim).projection, L2Normalize()),
                                            nn.Linear(args.K_dim, args.nmb_prototypes, bias=False))
        return partial(build_swav_head, hidden_mlp=args.hidden_mlp, feat_dim=args.feat_dim,
                       nmb_prototypes=args.nmb_prototypes)

    @classmethod
    def view_spec(cls, args: argparse.Namespace, dataset: DatasetEntry) -> ViewSpec:
        """Multi-crop: --nmb_crops crops of --size_crops pixels with their RandomResizedCrop scale ranges."""
        return ViewSpec(nmb_crops=tuple(args.nmb_crops), size_crops=tuple(args.size_crops),
                        min_scale_crops=tuple(args.min_scale_crops), max_scale_crops=tuple(args.max_scale_crops),
                        blur_kernel_size=dataset.blur_kernel_size)

    @classmethod
    def learning_rate_schedule(cls, args: argparse.Namespace, steps_per_epoch: int) -> LearningRateSchedule:
        # Not MocoSFL's: no milestones unless given, the client factor 0.1, no --compat client stepping.
        if args.use_swav_scheduler:
            return SwavWarmupCosine(args, steps_per_epoch, mocosfl_defaults=False)
        return LearningRateSchedule(args, steps_per_epoch, mocosfl_defaults=False)

    def __init__(self, args: argparse.Namespace, server: nn.Module, device: torch.device) -> None:
        super().__init__(args, server, device)
        self.nmb_crops = tuple(args.nmb_crops)
        self.trainable_crops = tuple(range(sum(args.nmb_crops)))
        self.crops_for_assign = tuple(args.crops_for_assign)
        self.temperature = args.temperature
        self.epsilon = args.epsilon
        self.sinkhorn_iterations = args.sinkhorn_iterations
        self.freeze_prototypes_niters = args.freeze_prototypes_niters
        self.epoch_queue_starts = args.epoch_queue_starts
        embedding_dim = args.K_dim if args.moco_version is not None else args.feat_dim
        self.queue = (EmbeddingQueue(len(args.crops_for_assign), args.queue_length, embedding_dim, device=device)
                      if args.queue_length > 0 else None)
        # --compat mocosfl: the seed fork's per-client codes and loss, and client gradients of the global crops only
        # (the fork detached the local crops' smashed data); by default every crop trains the clients.
        self.seed_fork_loss = mocosfl_compat(args)
        self.gradient_crops = tuple(range(args.nmb_crops[0])) if self.seed_fork_loss else None
        self._monitor: dict[str, Tensor] = {}
        self._monitor_steps = 0

    @property
    def prototypes(self) -> nn.Linear:
        return self.server.prototypes

    def compute_loss(self, smashed: Sequence[Tensor], momentum_smashed: Sequence[Tensor],
                     context: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        normalize_prototypes_(self.prototypes)
        embeddings = self.forward_server(resolution_groups(smashed))
        scores = self.prototypes(embeddings)
        rows = smashed[0].shape[0]
        crop_embeddings = embeddings.split(rows)
        crop_scores = scores.split(rows)
        use_queue = self.queue is not None and context.epoch >= self.epoch_queue_starts
        if self.seed_fork_loss:
            loss, first_codes = self._seed_fork_loss(crop_embeddings, crop_scores, use_queue,
                                                     context.layout.rows_per_client)
            self._record(first_codes, crop_embeddings[0].detach())
            return loss, {}
        codes: dict[int, Tensor] = {}
        with torch.no_grad():
            for slot, crop in enumerate(self.crops_for_assign):
                assignment_scores = crop_scores[crop].detach()
                if use_queue:
                    # One queue, identical on every rank (the gathered batches, newest first): its rows enter the
                    # global Sinkhorn once, from rank 0, exactly as in a single process.
                    if not self.distributed or dist.get_rank() == 0:
                        assignment_scores = self.queue.scores_with_queue(slot, assignment_scores, self.prototypes)
                    pushed = crop_embeddings[crop].detach()
                    self.queue.push(slot, all_gather_rows(pushed) if self.distributed else pushed)
                codes[crop] = sinkhorn_knopp(assignment_scores, self.epsilon, self.sinkhorn_iterations,
                                             distributed=self.distributed)[-rows:]
        loss = swapped_prediction_loss(crop_scores, codes, self.temperature)
        self._record(codes[self.crops_for_assign[0]], crop_embeddings[0].detach())
        return loss, {}

    def _seed_fork_loss(self, crop_embeddings: Sequence[Tensor], crop_scores: Sequence[Tensor],
                        use_queue: bool, rows_per_client: Sequence[int]) -> tuple[Tensor, Tensor]:
        """--compat mocosfl: the seed fork's loss (Sinkhorn and swapped prediction per client, accumulated as
        seed_fork_accumulated_loss) and the codes of the first assignment crop, clients in pool order."""
        if self.distributed:
            raise UserError("--compat mocosfl's SwAV (the seed fork's per-client loss) runs in one process")
        if sum(rows_per_client) != crop_scores[0].shape[0]:
            raise ValueError(f"the step's layout ({sum(rows_per_client)} rows) does not describe the "
                             f"{crop_scores[0].shape[0]} smashed rows")
        client_losses, first_codes, start = [], [], 0
        for client_rows in rows_per_client:
            block = slice(start, start + client_rows)
            start += client_rows
            codes: dict[int, Tensor] = {}
            with torch.no_grad():
                for slot, crop in enumerate(self.crops_for_assign):
                    assignment_scores = crop_scores[crop][block].detach()
                    if use_queue:
                        # As the fork: a client's codes see the queue before its own rows are pushed.
                        assignment_scores = self.queue.scores_with_queue(slot, assignment_scores, self.prototypes)
                        self.queue.push(slot, crop_embeddings[crop][block].detach())
                    codes[crop] = sinkhorn_knopp(assignment_scores, self.epsilon, self.sinkhorn_iterations)[-client_rows:]
            client_losses.append(swapped_prediction_loss([scores[block] for scores in crop_scores], codes,
                                                         self.temperature))
            first_codes.append(codes[self.crops_for_assign[0]])
        return seed_fork_accumulated_loss(client_losses, len(self.crops_for_assign)), torch.cat(first_codes)

    @torch.no_grad()
    def _record(self, codes: Tensor, embeddings: Tensor) -> None:
        """Accumulate the epoch's monitoring values on the device (read once per epoch, no per-step sync)."""
        if self.distributed:
            values = _global_monitor_values(codes, embeddings)
        else:
            values = {"code_entropy": code_entropy(codes), "prototypes_used": prototypes_used(codes).float(),
                      "embedding_std": embedding_std(embeddings.float())}
        for name, value in values.items():
            self._monitor[name] = self._monitor.get(name, 0.0) + value
        self._monitor_steps += 1

    def before_server_step(self, global_step: int) -> None:
        # SwAV keeps the prototypes still at first, so the codes do not chase a moving target.
        if global_step < self.freeze_prototypes_niters:
            self.prototypes.weight.grad = None

    def start_epoch(self, epoch: int) -> None:
        self._monitor, self._monitor_steps = {}, 0

    def epoch_summary(self) -> dict[str, float]:
        summary = {name: float(value) / max(1, self._monitor_steps) for name, value in self._monitor.items()}
        summary["ln_nmb_prototypes"] = math.log(self.prototypes.out_features)
        return summary

    def extra_state(self) -> dict:
        return {"queue": self.queue.state_dict() if self.queue is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if self.queue is not None:
            self.queue.load_state_dict(state["queue"])
