"""MocoSFL's FL-MoCo baseline (--scheme fl): every client trains the whole network with its own MoCo (momentum
encoder, queue of --K keys), --local_epoch passes over its data per epoch, then FedAvg. The training loop runs it
like the split step: the same data, pools, FedAvg points, checkpoints and evaluations."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from functions.core.distributed import Runtime, all_gather_rows
from functions.core.errors import UserError
from functions.core.options import typed_options
from functions.core.precision import MixedPrecision
from functions.data.layout import StepLayout
from functions.data.loaders import StepBatch
from functions.losses.moco import ClientQueues, info_nce_loss
from functions.methods.base import ServerMethod
from functions.methods.moco import MocoServer
from functions.methods.registry import method_class
from functions.sfl.clients.engines import ClientEngine, ClientEngineOptions, build_client_engine
from models.split import build_unsplit_model


class NoServer(ServerMethod):
    """The server of FL: it holds nothing; the clients' queues are its state so that checkpoints keep them."""

    trainable_crops = (0, 1)  # each client runs both views through its model and its momentum copy
    momentum_crops = (0, 1)

    def __init__(self, queues: ClientQueues) -> None:
        super().__init__(argparse.Namespace(), nn.Module(), torch.device("cpu"))
        self.queues = queues

    def encode_features(self, smashed: Tensor) -> Tensor:
        return smashed

    def extra_state(self) -> dict:
        return self.queues.state_dict()

    def load_extra_state(self, state: dict) -> None:
        self.queues.load_state_dict(state)


@dataclass(eq=False)
class FederatedMocoStep:
    """One FL-MoCo step: each pool client's MoCo loss on its own batch, each client's own update."""

    method: NoServer
    clients: ClientEngine
    server_optimizer: torch.optim.Optimizer  # empty: FL has no server; kept for the checkpoint's layout
    precision: MixedPrecision
    runtime: Runtime
    temperature: float
    symmetric: bool
    client_momentum: float
    sends_smashed_data: ClassVar[bool] = False  # FL: only weights travel, at FedAvg

    def set_learning_rates(self, server_lr: float, client_lr: float) -> None:
        self.clients.set_lr(client_lr)

    def encoder(self, client_model: nn.Module) -> Callable[[Tensor], Tensor]:
        """The pooled backbone features of a client's whole network (what the probes see)."""
        return client_model.features

    def __call__(self, batch: StepBatch, epoch: int, global_step: int, row_share: float = 1.0,
                 layout: StepLayout | None = None, send_gradients: bool = True,
                 record: Callable | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Every pool client of this process trains one step on its batch; returns the pool's mean loss here."""
        if not send_gradients or record is not None:
            raise UserError("--loss_threshold saves split learning's communication; FL (--scheme fl) has none")
        clients, precision, pool, rows = self.clients, self.precision, batch.client_ids, batch.rows_per_client
        layout = layout or StepLayout.of(pool, rows)
        # MocoSFL's FL-MoCo moves a client's momentum copy as its step begins (after any FedAvg since its last one).
        clients.update_momentum_copies(pool, self.client_momentum)
        precision.begin_step()
        clients.zero_grad(pool)
        with precision.autocast():
            queries = clients.forward(batch.crops, pool, rows)
            keys = clients.momentum_forward(batch.crops, pool, rows)
        losses, accuracies = [], []
        for client, begin, end in layout.local_blocks():
            negatives = self.method.queues.of(client).negatives
            terms = [info_nce_loss(queries[0][begin:end], keys[1][begin:end], negatives, self.temperature)]
            if self.symmetric:
                terms.append(info_nce_loss(queries[1][begin:end], keys[0][begin:end], negatives, self.temperature))
            losses.append(sum(term[0] for term in terms))
            accuracies.append(torch.stack([term[1] for term in terms]).mean())
        # Each client's loss depends on its own weights only: their sum gives every client its own gradient.
        precision.scaler.scale(torch.stack(losses).sum()).backward()
        clients.forget_outputs()
        clients.step(pool, precision.scaler)
        precision.end_step(self.server_optimizer)
        enqueued = [keys[0], keys[1]] if self.symmetric else [keys[1]]
        if self.runtime.is_distributed:
            enqueued = [all_gather_rows(k) for k in enqueued]
        self.method.queues.enqueue(torch.cat(enqueued).detach(), layout)
        loss = torch.stack(losses).mean().detach()
        # Under torchrun the loop sums each rank's loss times its row share: weight this rank's mean accordingly.
        return loss, {"contrastive_acc": torch.stack(accuracies).mean().detach()}


def build_fl_step(args: argparse.Namespace, runtime: Runtime, precision: MixedPrecision, *,
                  engine: str = "auto") -> FederatedMocoStep:
    """The whole network (MoCo's head) on every client, each with a momentum copy and a queue of --K keys."""
    if not issubclass(method_class(args.method), MocoServer):
        raise UserError("--scheme fl is MocoSFL's FL-MoCo baseline: run it with run_sflmoco.py")
    network = build_unsplit_model(args.arch, head=method_class(args.method).head_builder(args),
                                  use_ws=not args.disable_WS, width=args.width, image_size=args.data_size)
    clients = build_client_engine(network, typed_options(ClientEngineOptions, args), runtime.device,
                                  keep_momentum_copies=True, engine=engine)
    generator = torch.Generator().manual_seed(args.seed)
    queues = ClientQueues(args.K * args.num_client, args.K_dim, args.num_client, device=runtime.device,
                          generator=generator)
    empty = torch.optim.SGD([torch.zeros(0, requires_grad=True)], lr=args.lr)
    return FederatedMocoStep(NoServer(queues), clients, empty, precision, runtime, args.T, bool(args.symmetric),
                             args.moco_momentum)
