"""MoCo on the server side of split federated learning: InfoNCE losses, the shared key queue, momentum updates.

The top of this module holds pure loss functions and small state classes; they know nothing about clients,
optimisers or the training loop, so they can be checked directly against the formulas of He et al. (MoCo).
"""
from __future__ import annotations

import argparse
import copy
from functools import partial
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor, nn

from functions.core.compat import mocosfl_compat
from functions.core.distributed import all_gather_rows
from functions.core.errors import UserError, check_range
from functions.data.layout import StepLayout
from functions.data.views import ViewSpec
from functions.losses.moco import ClientQueues, dual_temperature_loss, info_nce_loss
from functions.methods.base import ServerMethod, StepContext
from functions.methods.heads import MAX_HEAD_DIM, MAX_QUEUE_KEYS, MOCO_VERSIONS, build_moco_head
from functions.methods.registry import register_method
from functions.sfl.clients.loop import momentum_update_
from models.split import HeadBuilder, architecture

if TYPE_CHECKING:
    from functions.data.datasets import DatasetEntry


# ------------------------------------------------------------------------------------------------ the head


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
        if args.pairloader_option == "None":
            raise UserError("--pairloader_option None gives MoCo no augmented pairs; use mocov1 or mocov2")
        if args.symmetric and args.symmetric_both_views and "symmetric" in given:
            raise UserError("--symmetric and --symmetric_both_views are two forms of the symmetric loss; pick one")
        if args.symmetric_both_views:
            args.symmetric = False
        if args.K < 1 or args.K_dim < 1 or args.T <= 0 or args.temperature <= 0:
            raise UserError("--K, --K_dim, --T and --temperature must be positive")
        check_range("K", args.K, f"[1, {MAX_QUEUE_KEYS}]")
        check_range("K_dim", args.K_dim, f"[1, {MAX_HEAD_DIM}]")
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
        # The step's keys and their rows' layout, enqueued once the step is done.
        self._pending_keys: tuple[Tensor, StepLayout] | None = None
        # With BatchNorm in the server (largeV2's head) each view goes through it in a pass of its own, as in
        # MocoSFL, so that its statistics are those of one view; without, one pass over the stacked views gives
        # the same values faster.
        self.pass_per_view = any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in server.modules())

    def start_server_step(self) -> None:
        if not self.simco:
            # MocoSFL moves its momentum encoder at the start of the server's step, before the forward passes.
            momentum_update_(self.server_momentum, self.server, self.momentum)

    def _views(self, network: Callable[[Tensor], Tensor], views: Sequence[Tensor]) -> list[Tensor]:
        """`network` on each view: a pass per view with BatchNorm (see pass_per_view), else one stacked pass."""
        if self.pass_per_view:
            return [network(view) for view in views]
        return list(network(torch.cat(list(views))).split([view.shape[0] for view in views]))

    def compute_loss(self, smashed: Sequence[Tensor], momentum_smashed: Sequence[Tensor],
                     context: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        if self.simco:
            first, second = self.forward_server(torch.cat(list(smashed))).chunk(2)
            loss, accuracy = dual_temperature_loss(first, second, self.simco_temperature)
            return loss, {"contrastive_acc": accuracy}
        online_server = self.forward_server
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
            query = self.forward_server(smashed[0])
            with torch.no_grad():
                key = self.server_momentum(momentum_smashed[0])
            pairs, enqueued = [(query, key)], [key]
        terms = [self._info_nce(query, key, context.layout) for query, key in pairs]
        loss = sum(term[0] for term in terms)
        accuracy = torch.stack([term[1] for term in terms]).mean()
        # Keys join the queue only after this step's loss: they are never their own negatives.
        # Under torchrun each block's keys are gathered in rank order, which is the single-process row order.
        keys = torch.cat([all_gather_rows(k) for k in enqueued] if self.distributed else enqueued)
        self._pending_keys = keys, context.layout
        return loss, {"contrastive_acc": accuracy}

    def _info_nce(self, query: Tensor, key: Tensor, layout: StepLayout) -> tuple[Tensor, Tensor]:
        """InfoNCE of the step's rows, each against its own client's queue when clients keep their own."""
        if not self.queues.per_client:
            return info_nce_loss(query, key, self.queues.shared.negatives, self.temperature)
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
            self.queues.enqueue(*self._pending_keys)
            self._pending_keys = None

    def extra_state(self) -> dict:
        return self.queues.state_dict()

    def load_extra_state(self, state: dict) -> None:
        self.queues.load_state_dict(state)
