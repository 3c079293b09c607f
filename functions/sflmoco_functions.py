"""MoCo on the server side of split federated learning: InfoNCE losses, the shared key queue, momentum updates.

The top of this module holds pure loss functions and small state classes; they know nothing about clients,
optimisers or the training loop, so they can be checked directly against the formulas of He et al. (MoCo).
"""
from __future__ import annotations

import argparse
import copy
from functools import partial
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from functions.clients import momentum_update_
from functions.distributed import all_gather_rows, forward_server
from functions.errors import UserError
from functions.server_method import ServerMethod, register_method
from functions.views import ViewSpec
from models.split import Head, HeadBuilder

if TYPE_CHECKING:
    from functions.datasets import DatasetEntry

__all__ = ["info_nce_loss", "symmetric_info_nce_loss", "KeyQueue", "momentum_update_", "build_moco_head", "MocoServer"]
MOCO_VERSIONS = ("V1", "smallV2", "V2", "largeV2")
LARGE_V2_HIDDEN = 2048


def _check_temperature(temperature: float) -> None:
    """Reject a temperature that would divide by zero or flip the logits."""
    if not temperature > 0:
        raise UserError(f"the MoCo temperature must be > 0 (got {temperature}); set --T to a positive value such as 0.2")


def info_nce_loss(query: Tensor, key: Tensor, negatives: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """InfoNCE of each query against its own key (positive) and the queue (negatives); returns (mean loss, top-1 accuracy).

    query, key: (N, D), any scale; both are L2-normalised here and no gradient flows into ``key``.
    negatives: (K, D), already L2-normalised (the rows of a ``KeyQueue``); treated as constants.
    The logits (N, 1 + K) are [q.k, q.n_1 ... q.n_K] / temperature with the positive in column 0, and the loss
    is their mean cross-entropy with target 0. Accuracy is the fraction of rows whose largest logit is the
    positive. Everything is computed in float32, also under autocast or with fp16/bf16 inputs, because
    exp(1 / T) with a small T overflows half precision.
    """
    _check_temperature(temperature)
    if query.dim() != 2 or query.shape != key.shape:
        raise ValueError(f"query and key must both be (N, D); got {tuple(query.shape)} and {tuple(key.shape)}")
    if negatives.dim() != 2 or negatives.shape[1] != query.shape[1]:
        raise ValueError(f"negatives must be (K, {query.shape[1]}); got {tuple(negatives.shape)}")
    with torch.autocast(device_type=query.device.type, enabled=False):
        query_unit = F.normalize(query.float(), dim=1)
        key_unit = F.normalize(key.detach().float(), dim=1)
        negatives_fp32 = negatives.detach().float()
        positive_logits = (query_unit * key_unit).sum(dim=1, keepdim=True)
        negative_logits = query_unit @ negatives_fp32.T
        logits = torch.cat([positive_logits, negative_logits], dim=1) / temperature
        targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.detach().argmax(dim=1) == 0).float().mean()
    return loss, accuracy


def symmetric_info_nce_loss(
    q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, negatives: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE: loss(q1,k2) + loss(q2,k1) (MocoSFL's --symmetric), with mean accuracy.

    q1, q2 are the query-encoder outputs of views 1 and 2, k1, k2 the key-encoder outputs of the same views.
    The two terms are summed, not averaged, as MocoSFL does; the returned accuracy is the mean of the two
    terms' accuracies. Both terms use the same ``negatives``.
    """
    loss_12, accuracy_12 = info_nce_loss(q1, k2, negatives, temperature)
    loss_21, accuracy_21 = info_nce_loss(q2, k1, negatives, temperature)
    return loss_12 + loss_21, (accuracy_12 + accuracy_21) / 2


class KeyQueue:
    """Ring buffer of the last `size` normalised keys shared by all clients (MoCo's dictionary).

    ``negatives`` is a (size, dim) float32 tensor; ``pointer`` is the row the next key is written to.
    It starts as random unit rows, so the first steps already have a full set of (uninformative) negatives.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if size < 1:
            raise UserError(f"the MoCo queue size must be >= 1 (got {size}); set --K to a positive number of keys")
        if dim < 1:
            raise UserError(f"the MoCo feature dimension must be >= 1 (got {dim}); set --K_dim to a positive value")
        self.size = size
        self.dim = dim
        # Draw on the generator's own device so a CPU generator can seed a queue that lives on the GPU.
        draw_device = generator.device if generator is not None else device
        initial = torch.randn(size, dim, generator=generator, device=draw_device, dtype=torch.float32)
        self.negatives: Tensor = F.normalize(initial, dim=1).to(device)
        self.pointer: int = 0

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write the (N, dim) keys, normalised, at the pointer with wrap-around and advance the pointer by N.

        The result equals writing the keys one by one in batch order, so when N > size only the newest
        (last) ``size`` keys survive.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (N, {self.dim}); got {tuple(keys.shape)}")
        count = keys.shape[0]
        if count == 0:
            return
        keys_unit = F.normalize(keys.detach().float(), dim=1).to(self.negatives.device)
        rows = (self.pointer + torch.arange(count, device=self.negatives.device)) % self.size
        # Only the last `size` writes survive; dropping the others also keeps the row indices unique.
        kept = min(count, self.size)
        self.negatives[rows[-kept:]] = keys_unit[-kept:]
        self.pointer = (self.pointer + count) % self.size

    def state_dict(self) -> dict:
        """The queue contents and pointer, for checkpoints."""
        return {"negatives": self.negatives.detach().clone(), "pointer": self.pointer}

    def load_state_dict(self, state: dict) -> None:
        """Restore contents and pointer saved by ``state_dict``; the queue size and dim must match."""
        negatives = state["negatives"]
        if tuple(negatives.shape) != (self.size, self.dim):
            raise UserError(
                f"the checkpoint's MoCo queue is {tuple(negatives.shape)} but this run expects ({self.size}, {self.dim});"
                " resume with the same --K and --K_dim as the checkpointed run"
            )
        pointer = int(state["pointer"])
        if not 0 <= pointer < self.size:
            raise UserError(f"the checkpoint's MoCo queue pointer {pointer} is outside [0, {self.size}); the checkpoint is damaged")
        self.negatives.copy_(negatives.to(self.negatives.device, torch.float32))
        self.pointer = pointer


# ------------------------------------------------------------------------------------------------ the head
def build_moco_head(feature_dim: int, moco_version: str = "V2", K_dim: int = 128) -> Head:
    """MocoSFL's projection heads: V1 linear; smallV2 / V2 / largeV2 a two-layer MLP of hidden width K_dim,
    feature_dim and 2048."""
    versions = {version.lower(): version for version in MOCO_VERSIONS}
    version = versions.get(str(moco_version).lower())
    if version is None:
        raise UserError(f"--moco_version {moco_version} is not supported; choose one of {', '.join(MOCO_VERSIONS)}")
    if isinstance(K_dim, bool) or not isinstance(K_dim, int) or K_dim <= 0:
        raise UserError(f"--K_dim must be a positive integer, got {K_dim}")
    if version == "V1":
        return Head(nn.Linear(feature_dim, K_dim))
    hidden = {"smallV2": K_dim, "V2": feature_dim, "largeV2": LARGE_V2_HIDDEN}[version]
    return Head(nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, K_dim)))


# ------------------------------------------------------------------------------------------ the server method
@register_method("moco", entry_script="run_sflmoco.py", description="MoCo (MocoSFL)")
class MocoServer(ServerMethod):
    """MoCo's server side: query encoder, momentum key encoder, shared key queue and (symmetric) InfoNCE.

    Without --symmetric, view 0 is the query (through the clients' models) and view 1 the key (through the
    clients' momentum copies); with it, both views are queries and keys.
    """

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        moco = parser.add_argument_group("MoCo")
        moco.add_argument("--moco_version", type=str, default="V2", choices=list(MOCO_VERSIONS),
                          help="projection head: V1 linear, smallV2/V2/largeV2 two-layer MLP of growing width")
        moco.add_argument("--K", type=int, default=6000, help="keys in the shared queue (negatives)")
        moco.add_argument("--K_dim", type=int, default=128, help="dimension of keys and queries")
        moco.add_argument("--T", type=float, default=0.1, help="InfoNCE temperature")
        moco.add_argument("--moco_momentum", type=float, default=0.99,
                          help="momentum of the key encoders (client copies and server)")
        moco.add_argument("--symmetric", action="store_true",
                          help="add the swapped InfoNCE term (both views serve as query and key)")
        moco.add_argument("--fedavg_momentum", action="store_true",
                          help="FedAvg also averages the clients' momentum copies")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.K < 1 or args.K_dim < 1 or args.T <= 0:
            raise UserError("--K, --K_dim and --T must be positive")
        if not 0.0 <= args.moco_momentum < 1.0:
            raise UserError(f"--moco_momentum must be in [0, 1) (got {args.moco_momentum})")

    @classmethod
    def head_builder(cls, args: argparse.Namespace) -> HeadBuilder:
        return partial(build_moco_head, moco_version=args.moco_version, K_dim=args.K_dim)

    @classmethod
    def view_spec(cls, args: argparse.Namespace, dataset: "DatasetEntry") -> ViewSpec:
        """MoCo v2: two views of the dataset's global crop size, RandomResizedCrop scale (0.2, 1)."""
        return ViewSpec(nmb_crops=(2,), size_crops=(dataset.crop_sizes[0],), min_scale_crops=(0.2,),
                        max_scale_crops=(1.0,), blur_kernel_size=dataset.blur_kernel_size)

    def __init__(self, args: argparse.Namespace, server: nn.Module, device: torch.device) -> None:
        super().__init__(args, server, device)
        self.server_momentum = copy.deepcopy(server)
        for parameter in self.server_momentum.parameters():
            parameter.requires_grad_(False)
        self.temperature = args.T
        self.momentum = args.moco_momentum
        self.client_momentum = args.moco_momentum
        self.average_momentum_copies = args.fedavg_momentum
        self.symmetric = args.symmetric
        self.trainable_crops = (0, 1) if args.symmetric else (0,)
        self.momentum_crops = (0, 1) if args.symmetric else (1,)
        generator = torch.Generator().manual_seed(args.seed)
        self.queue = KeyQueue(args.K, args.K_dim, device=device, generator=generator)
        self._pending_keys: Tensor | None = None
        # Set by the distributed set-up: keys of every rank then join one queue, identical on every rank.
        self.distributed = False

    def compute_loss(self, smashed: Sequence[Tensor], momentum_smashed: Sequence[Tensor],
                     epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        queries = forward_server(self, torch.cat(list(smashed))).chunk(len(smashed))
        with torch.no_grad():
            keys = self.server_momentum(torch.cat(list(momentum_smashed))).chunk(len(momentum_smashed))
        negatives = self.queue.negatives
        if self.symmetric:
            loss, accuracy = symmetric_info_nce_loss(queries[0], keys[0], queries[1], keys[1], negatives, self.temperature)
        else:
            loss, accuracy = info_nce_loss(queries[0], keys[0], negatives, self.temperature)
        # Keys join the queue only after this step's loss: they are never their own negatives.
        # Under torchrun each crop's keys are gathered in rank order, which is the single-process row order.
        self._pending_keys = torch.cat([all_gather_rows(k) for k in keys] if self.distributed else list(keys))
        return loss, {"contrastive_acc": accuracy}

    def after_server_step(self) -> None:
        momentum_update_(self.server_momentum, self.server, self.momentum)
        if self._pending_keys is not None:
            self.queue.enqueue(self._pending_keys)
            self._pending_keys = None

    def extra_state(self) -> dict:
        return {"queue": self.queue.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.queue.load_state_dict(state["queue"])
