"""MoCo on the server side of split federated learning: InfoNCE losses, the shared key queue, momentum updates.

The top of this module holds pure loss functions and small state classes; they know nothing about clients,
optimisers or the training loop, so they can be checked directly against the formulas of He et al. (MoCo).
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from functions.clients import momentum_update_
from functions.compat import mocosfl_compat
from functions.distributed import all_gather_rows, forward_server
from functions.errors import UserError
from functions.server_method import ServerMethod, StepLayout, register_method
from functions.views import ViewSpec
from models.split import Head, HeadBuilder

if TYPE_CHECKING:
    from functions.datasets import DatasetEntry

__all__ = ["info_nce_loss", "symmetric_info_nce_loss", "dual_temperature_loss", "KeyQueue", "ClientQueues",
           "momentum_update_", "build_moco_head", "MocoServer"]


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
        unit_rows: bool = True,
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
        # unit_rows=False: the raw Gaussian rows MocoSFL starts its per-client queues with (--compat mocosfl).
        self.negatives: Tensor = (F.normalize(initial, dim=1) if unit_rows else initial).to(device)
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


def dual_temperature_loss(query: Tensor, key: Tensor, temperature: float, dt_m: float = 10.0) -> tuple[Tensor, Tensor]:
    """SimCo's dual-temperature InfoNCE with in-batch negatives (the seed's --loss_type simco); (loss, accuracy).

    Row i's positive is key i, its negatives the other keys of the batch. The cross-entropy at `temperature` is
    weighted, per row and without gradient, by (1 - p_inter) / (1 - p_intra), the probabilities of the positive
    at temperature * dt_m and at temperature (Zhang et al., dual temperature helps contrastive learning).
    """
    _check_temperature(temperature)
    if query.dim() != 2 or query.shape != key.shape or query.shape[0] < 2:
        raise ValueError(f"query and key must both be (N, D) with N >= 2; got {tuple(query.shape)}, {tuple(key.shape)}")
    with torch.autocast(device_type=query.device.type, enabled=False):
        query_unit, key_unit = F.normalize(query.float(), dim=1), F.normalize(key.float(), dim=1)
        similarity = query_unit @ key_unit.T
        rows = similarity.shape[0]
        positive = similarity.diagonal().unsqueeze(1)
        negatives = similarity.masked_select(~torch.eye(rows, dtype=torch.bool, device=similarity.device))
        logits = torch.cat([positive, negatives.view(rows, rows - 1)], dim=1)
        intra = F.softmax(logits / temperature, dim=1)[:, 0]
        inter = F.softmax(logits / (temperature * dt_m), dim=1)[:, 0]
        weight = ((1 - inter) / (1 - intra)).detach()
        loss = (weight * -F.log_softmax(logits / temperature, dim=1)[:, 0]).mean()
        accuracy = (logits.detach().argmax(dim=1) == 0).float().mean()
    return loss, accuracy


class ClientQueues:
    """The key queue of the run: one shared KeyQueue of `size` keys, or (num_client > 0, MocoSFL's
    --disable_feature_sharing) one KeyQueue of size // num_client keys per client, each fed its own client's keys."""

    def __init__(self, size: int, dim: int, num_client: int = 0, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None, unit_client_rows: bool = True) -> None:
        self.per_client = num_client > 0
        self.shared = KeyQueue(size, dim, device=device, generator=generator) if not self.per_client else None
        self.clients = [KeyQueue(size // num_client, dim, device=device, generator=generator,
                                 unit_rows=unit_client_rows) for _ in range(num_client)]

    def of(self, client: int) -> KeyQueue:
        """The queue of `client` (per-client queues only)."""
        return self.clients[client]

    def enqueue(self, keys: Tensor, layout: StepLayout) -> None:
        """Enqueue the step's keys: blocks of the pool's rows (every process's), each client's rows into its queue."""
        if not self.per_client:
            self.shared.enqueue(keys)
            return
        total = sum(layout.pool_rows)
        blocks = keys.split(total)
        for client, begin, end in layout.pool_blocks():
            self.of(client).enqueue(torch.cat([block[begin:end] for block in blocks]))

    def state_dict(self) -> dict:
        """Queue contents for checkpoints (the shared queue under the key of earlier checkpoints)."""
        if not self.per_client:
            return {"queue": self.shared.state_dict()}
        return {"client_queues": [queue.state_dict() for queue in self.clients]}

    def load_state_dict(self, state: dict) -> None:
        if not self.per_client:
            self.shared.load_state_dict(state["queue"])
            return
        if len(state["client_queues"]) != len(self.clients):
            raise UserError(f"the checkpoint holds {len(state['client_queues'])} client queues, this run has "
                            f"{len(self.clients)} clients")
        for queue, queue_state in zip(self.clients, state["client_queues"]):
            queue.load_state_dict(queue_state)


# ------------------------------------------------------------------------------------------------ the head
@dataclass(frozen=True)
class MocoVersion:
    """What a MocoSFL --moco_version fixes: the head, the key dimension, the views, the loss and the schedule."""

    mlp: bool
    K_dim: int
    pairloader_option: str
    symmetric: bool
    cos: bool | None          # None: the version leaves --cos alone
    CLR_option: str           # recorded as MocoSFL does; it never changes the training


MOCO_VERSIONS: dict[str, MocoVersion] = {
    "V1": MocoVersion(mlp=False, K_dim=128, pairloader_option="mocov1", symmetric=False, cos=False,
                      CLR_option="multistep"),
    "smallV2": MocoVersion(mlp=True, K_dim=512, pairloader_option="mocov2", symmetric=True, cos=True, CLR_option="cos"),
    "V2": MocoVersion(mlp=True, K_dim=1024, pairloader_option="mocov2", symmetric=True, cos=True, CLR_option="cos"),
    "largeV2": MocoVersion(mlp=True, K_dim=2048, pairloader_option="mocov2", symmetric=True, cos=True,
                           CLR_option="cos"),
    "largeV2_aggressive": MocoVersion(mlp=True, K_dim=2048, pairloader_option="mocov2", symmetric=True, cos=None,
                                      CLR_option="aggressive"),
    "largeV2_highmomen": MocoVersion(mlp=True, K_dim=2048, pairloader_option="mocov2", symmetric=True, cos=None,
                                     CLR_option="highmomen"),
}
LARGE_V2_HIDDEN = 4096  # the larger classifier of Zhuang et al. (divergence-aware FSSL), as MocoSFL builds it


def _xavier(module: nn.Module) -> nn.Module:
    """MocoSFL's init of its heads: Xavier-uniform weights, zero biases, on every Linear layer."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight, gain=1.0)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def build_moco_head(feature_dim: int, moco_version: str = "V2", K_dim: int = 1024, mlp: bool = True,
                    expansion: int = 1) -> Head:
    """MocoSFL's projection heads: without --mlp one Linear layer to K_dim; with it, for largeV2, Linear to 4096,
    BatchNorm, ReLU, Linear to K_dim; for the other V2 versions Linear to K_dim * expansion, ReLU, Linear to
    K_dim (expansion: the architecture's, 4 for bottleneck ResNets). Xavier-initialised, as MocoSFL does."""
    if moco_version not in MOCO_VERSIONS:
        raise UserError(f"--moco_version {moco_version} is not supported; choose one of {', '.join(MOCO_VERSIONS)}")
    if isinstance(K_dim, bool) or not isinstance(K_dim, int) or K_dim <= 0:
        raise UserError(f"--K_dim must be a positive integer, got {K_dim}")
    if not mlp:
        return Head(_xavier(nn.Linear(feature_dim, K_dim)))
    if moco_version == "V1":
        raise UserError("--mlp needs a V2 version (--moco_version smallV2, V2 or largeV2): MocoSFL has no V1 MLP head")
    if moco_version == "largeV2":
        layers = [nn.Linear(feature_dim, LARGE_V2_HIDDEN), nn.BatchNorm1d(LARGE_V2_HIDDEN), nn.ReLU(),
                  nn.Linear(LARGE_V2_HIDDEN, K_dim)]
    else:
        hidden = K_dim * expansion
        layers = [nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, K_dim)]
    return Head(_xavier(nn.Sequential(*layers)))


def moco_view_spec(pairloader_option: str, aug_plus: bool, dataset: "DatasetEntry") -> ViewSpec:
    """MocoSFL's pair loaders: two views of the dataset's size, RandomResizedCrop of torchvision's default scale
    (0.08, 1), colour jitter, grayscale, flip; mocov2 (or --aug_plus) adds the Gaussian blur."""
    blur = 0.5 if pairloader_option == "mocov2" or aug_plus else 0.0
    return ViewSpec(nmb_crops=(2,), size_crops=(dataset.crop_sizes[0],), min_scale_crops=(0.08,),
                    max_scale_crops=(1.0,), blur_kernel_size=dataset.blur_kernel_size, blur_probability=blur)


# ------------------------------------------------------------------------------------------ the server method
@register_method("moco", entry_script="run_sflmoco.py", description="MoCo (MocoSFL)")
class MocoServer(ServerMethod):
    """MoCo's server side: query encoder, momentum key encoder, key queue(s) and InfoNCE.

    View 0 goes through the clients' models (the query), view 1 through their momentum copies (the key).
    --symmetric adds MocoSFL's swapped term: the momentum copies' smashed data as the query (gradients reach the
    server only) and the clients' smashed data through the momentum server as the key. --symmetric_both_views
    instead sends both views through both client models (both views send gradients to the clients).
    --loss_type simco sends both views through the clients' models and uses in-batch negatives (no queue, no
    momentum encoders). --disable_feature_sharing gives every client its own queue of K / num_client keys.
    """

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        moco = parser.add_argument_group("MoCo (a --moco_version sets the options marked 'version's' unless given)")
        moco.add_argument("--moco_version", type=str, default="V2", choices=list(MOCO_VERSIONS),
                          help="MocoSFL's versions: V1 (linear head, K_dim 128, mocov1 views, MultiStepLR); smallV2, "
                               "V2, largeV2 (MLP head, K_dim 512 / 1024 / 2048, mocov2 views, symmetric loss, cosine "
                               "lr); largeV2_aggressive and largeV2_highmomen (as largeV2 with the V2 head shape)")
        moco.add_argument("--K", type=int, default=6000, help="keys in the queue (negatives)")
        moco.add_argument("--K_dim", type=int, default=None, help="dimension of keys and queries (default: the version's)")
        moco.add_argument("--T", type=float, default=0.1, help="InfoNCE temperature")
        moco.add_argument("--moco_momentum", type=float, default=0.99,
                          help="momentum of the key encoders (client copies and server)")
        moco.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                          help="add MocoSFL's swapped InfoNCE term (default: the version's)")
        moco.add_argument("--symmetric_both_views", action="store_true",
                          help="symmetric loss with both views through the clients' models and momentum copies (both "
                               "views send gradients to the clients; about twice the client work of --symmetric)")
        moco.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=None,
                          help="MLP projection head instead of one linear layer (default: the version's)")
        moco.add_argument("--pairloader_option", type=str, default=None, choices=["mocov1", "mocov2", "None"],
                          help="MocoSFL's view recipe: mocov1 without blur, mocov2 with it (default: the version's)")
        moco.add_argument("--aug_plus", action="store_true", help="add the Gaussian blur to the views (mocov1)")
        moco.add_argument("--CLR_option", type=str, default=None,
                          help="MocoSFL's client lr option, set by the version and recorded; like MocoSFL, it "
                               "changes nothing (the clients follow --cos / --milestones)")
        moco.add_argument("--loss_type", type=str, default="moco", choices=["moco", "simco"],
                          help="moco: InfoNCE against the queue; simco: the seed's dual-temperature loss with "
                               "in-batch negatives (--temperature), no queue and no momentum encoders")
        moco.add_argument("--temperature", type=float, default=0.1, help="temperature of --loss_type simco")
        moco.add_argument("--disable_feature_sharing", action="store_true",
                          help="one queue per client (K / num_client keys each) instead of one shared queue")
        moco.add_argument("--fedavg_momentum", action="store_true",
                          help="FedAvg also averages the clients' momentum copies")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        version, given = MOCO_VERSIONS[args.moco_version], set(getattr(args, "_given", ()))
        for name in ("mlp", "K_dim", "pairloader_option", "symmetric", "CLR_option", "cos"):
            preset = getattr(version, name)
            if getattr(args, name) is None and preset is not None:
                setattr(args, name, preset)  # the version's value; one given explicitly wins
        if args.cos is None:
            args.cos = False
        if args.pairloader_option == "None":
            raise UserError("--pairloader_option None gives MoCo no augmented pairs; use mocov1 or mocov2")
        if args.symmetric and args.symmetric_both_views and "symmetric" in given:
            raise UserError("--symmetric and --symmetric_both_views are two forms of the symmetric loss; pick one")
        if args.symmetric_both_views:
            args.symmetric = False
        if args.K < 1 or args.K_dim < 1 or args.T <= 0 or args.temperature <= 0:
            raise UserError("--K, --K_dim, --T and --temperature must be positive")
        if not 0.0 <= args.moco_momentum < 1.0:
            raise UserError(f"--moco_momentum must be in [0, 1) (got {args.moco_momentum})")
        if args.scheme == "fl" and args.loss_type != "moco":
            raise UserError("--scheme fl is MocoSFL's FL-MoCo baseline: run it with --loss_type moco")
        if args.disable_feature_sharing and args.K < args.num_client:
            raise UserError(f"--disable_feature_sharing splits --K {args.K} over {args.num_client} clients; "
                            "use a --K of at least one key per client")

    @classmethod
    def checkpoint_problem(cls, saved_args: dict) -> str | None:
        if "mlp" not in saved_args:
            return ("was written before the MoCo heads and the symmetric loss followed MocoSFL (its head has another "
                    "shape); evaluate or resume it with the version that wrote it")
        return None

    @classmethod
    def head_builder(cls, args: argparse.Namespace) -> HeadBuilder:
        from models.split import architecture

        return partial(build_moco_head, moco_version=args.moco_version, K_dim=args.K_dim, mlp=args.mlp,
                       expansion=architecture(args.arch).expansion)

    @classmethod
    def view_spec(cls, args: argparse.Namespace, dataset: "DatasetEntry") -> ViewSpec:
        return moco_view_spec(args.pairloader_option, args.aug_plus, dataset)

    def __init__(self, args: argparse.Namespace, server: nn.Module, device: torch.device) -> None:
        super().__init__(args, server, device)
        self.server_momentum = copy.deepcopy(server)
        for parameter in self.server_momentum.parameters():
            parameter.requires_grad_(False)
        self.temperature = args.T
        self.simco_temperature = args.temperature
        self.simco = args.loss_type == "simco"
        self.momentum = args.moco_momentum
        self.client_momentum = 0.0 if self.simco else args.moco_momentum
        self.average_momentum_copies = args.fedavg_momentum
        self.symmetric = args.symmetric
        self.both_views = args.symmetric_both_views
        self.trainable_crops = (0, 1) if self.both_views or self.simco else (0,)
        self.momentum_crops = () if self.simco else (0, 1) if self.both_views else (1,)
        generator = torch.Generator().manual_seed(args.seed)
        # MocoSFL normalises the random keys its shared queue starts with but not those of its per-client queues
        # (a bug: until a client's queue has been refilled its negatives are ~sqrt(K_dim) long and dominate the
        # logits); --compat mocosfl starts them as MocoSFL does.
        self.queues = ClientQueues(args.K, args.K_dim, args.num_client if args.disable_feature_sharing else 0,
                                   device=device, generator=generator, unit_client_rows=not mocosfl_compat(args))
        self._pending_keys: Tensor | None = None
        self._layout = StepLayout.single()
        # With BatchNorm in the server (largeV2's head) each view goes through it in a pass of its own, as in
        # MocoSFL, so that its statistics are those of one view; without, one pass over the stacked views gives
        # the same values faster.
        self.pass_per_view = any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in server.modules())
        # Set by the distributed set-up: keys of every rank then join the queues, identical on every rank.
        self.distributed = False

    def start_step(self, layout: "StepLayout") -> None:
        self._layout = layout
        if not self.simco:
            # MocoSFL moves its momentum encoder at the start of the server's step, before the forward passes.
            momentum_update_(self.server_momentum, self.server, self.momentum)

    def _views(self, network: Callable[[Tensor], Tensor], views: Sequence[Tensor]) -> list[Tensor]:
        """`network` on each view: a pass per view with BatchNorm (see pass_per_view), else one stacked pass."""
        if self.pass_per_view:
            return [network(view) for view in views]
        return list(network(torch.cat(list(views))).split([view.shape[0] for view in views]))

    def compute_loss(self, smashed: Sequence[Tensor], momentum_smashed: Sequence[Tensor],
                     epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        if self.simco:
            first, second = forward_server(self, torch.cat(list(smashed))).chunk(2)
            loss, accuracy = dual_temperature_loss(first, second, self.simco_temperature)
            return loss, {"contrastive_acc": accuracy}
        online_server = partial(forward_server, self)
        if self.both_views:
            queries = self._views(online_server, smashed)
            with torch.no_grad():
                keys = self._views(self.server_momentum, momentum_smashed)
            pairs = [(queries[0], keys[1]), (queries[1], keys[0])]
            enqueued = list(keys)
        elif self.symmetric:
            # MocoSFL: the second term's query is the momentum copies' smashed data (no gradient to the clients).
            online, target = smashed[0], momentum_smashed[0]
            queries = self._views(online_server, [online, target])
            with torch.no_grad():  # MocoSFL's order of the key passes: the momentum copies' rows first
                keys = self._views(self.server_momentum, [target, online.detach()])[::-1]
            pairs = [(queries[0], keys[1]), (queries[1], keys[0])]
            # MocoSFL enqueues both keys (the online rows' first) in the shared queue, but in per-client queues
            # only the online rows' keys: it takes each client's rows of the first block (client_id * batch_size).
            enqueued = [keys[0]] if self.queues.per_client else [keys[0], keys[1]]
        else:
            query = forward_server(self, smashed[0])
            with torch.no_grad():
                key = self.server_momentum(momentum_smashed[0])
            pairs, enqueued = [(query, key)], [key]
        terms = [self._info_nce(query, key) for query, key in pairs]
        loss = sum(term[0] for term in terms)
        accuracy = torch.stack([term[1] for term in terms]).mean()
        # Keys join the queue only after this step's loss: they are never their own negatives.
        # Under torchrun each block's keys are gathered in rank order, which is the single-process row order.
        self._pending_keys = torch.cat([all_gather_rows(k) for k in enqueued] if self.distributed else enqueued)
        return loss, {"contrastive_acc": accuracy}

    def _info_nce(self, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """InfoNCE of the step's rows, each against its own client's queue when clients keep their own."""
        if not self.queues.per_client:
            return info_nce_loss(query, key, self.queues.shared.negatives, self.temperature)
        layout = self._layout
        losses, accuracies = [], []
        for client, begin, end in layout.local_blocks():
            loss, accuracy = info_nce_loss(query[begin:end], key[begin:end], self.queues.of(client).negatives,
                                           self.temperature)
            losses.append(loss * (end - begin))
            accuracies.append(accuracy * (end - begin))
        rows = query.shape[0]
        return torch.stack(losses).sum() / rows, torch.stack(accuracies).sum() / rows

    def after_server_step(self) -> None:
        if self.simco:
            return
        if self._pending_keys is not None:
            self.queues.enqueue(self._pending_keys, self._layout)
            self._pending_keys = None

    def extra_state(self) -> dict:
        return self.queues.state_dict()

    def load_extra_state(self, state: dict) -> None:
        self.queues.load_state_dict(state)
