"""One training step of split federated learning, built from the options; the training loop and the benchmark
both run this step.

Per step: the pool's clients run their layers on their own rows, the server stacks all rows and computes the
method's loss, one backward and one server step, the gradient rows go back to the clients that sent them, each
client steps. The clients' momentum copies move as the step begins (MocoSFL's order: after any FedAvg that
followed the previous step), the server's momentum encoder as the server's half begins.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from functions.core.distributed import Runtime
from functions.core.options import typed_options
from functions.core.precision import MixedPrecision
from functions.data.layout import StepLayout
from functions.data.loaders import StepBatch
from functions.methods.base import ServerMethod, StepContext
from functions.methods.registry import method_class
from functions.privacy.defences import PrivacyDefence, SmashedStep
from functions.privacy.expert import InitialWeightsOptions, load_initial_weights
from functions.sfl.clients.engines import ClientEngine, ClientEngineOptions, build_client_engine
from models.split import build_split_model


def bottleneck_of(args: argparse.Namespace) -> str | None:
    """The --bottleneck_option code of a run, None without a bottleneck."""
    return None if getattr(args, "bottleneck_option", "None") == "None" else args.bottleneck_option


def per_client_server_updates(args: argparse.Namespace) -> bool:
    """--server_update per_client (an option of the methods that offer it): one server update per client."""
    return getattr(args, "server_update", "joint") == "per_client"


@dataclass(eq=False)
class SplitStep:
    """The clients of a process, the server method, its optimizer and the precision settings; call it per batch."""

    method: ServerMethod
    clients: ClientEngine
    server_optimizer: torch.optim.Optimizer
    precision: MixedPrecision
    runtime: Runtime
    memory_format: torch.memory_format = torch.contiguous_format
    # Privacy defences (--defence): their extra gradients join the server's on the way to the clients.
    defences: Sequence[PrivacyDefence] = ()
    # --server_update per_client: one loss and one server update per client, in pool order (one process only).
    per_client_server_updates: bool = False
    sends_smashed_data: ClassVar[bool] = True  # split learning: smashed data up, gradients down

    def encoder(self, client_model: nn.Module) -> Callable[[Tensor], Tensor]:
        """A client part followed by the server's backbone: what the probes see."""
        return lambda images: self.method.encode_features(client_model(images))

    def set_learning_rates(self, server_lr: float, client_lr: float) -> None:
        """The learning rates of the server optimizer and of every client."""
        for group in self.server_optimizer.param_groups:
            group["lr"] = server_lr
        self.clients.set_lr(client_lr)

    def __call__(self, batch: StepBatch, epoch: int, global_step: int, row_share: float = 1.0,
                 layout: StepLayout | None = None, send_gradients: bool = True,
                 record: Callable[[list[Tensor], list[Tensor]], None] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """One SFL step over the pool; returns the loss and the method's statistics (on the device, detached).

        row_share: this process's fraction of the step's rows (torchrun), which weights its part of the loss.
        layout: the rows of every process's clients (torchrun); by default the batch's own clients are the pool.
        send_gradients: False for MocoSFL's upload-only epochs (--loss_threshold): the clients send their smashed
        data, the server trains, no gradient goes back and the clients stay as they are.
        record: called with the step's smashed data (the server's inputs), e.g. to replay them later.
        """
        method, clients, precision, pool = self.method, self.clients, self.precision, batch.client_ids
        crops = [crop.contiguous(memory_format=self.memory_format) for crop in batch.crops]
        if method.client_momentum > 0:
            # MocoSFL moves a client's momentum copy as the client's step begins, so after the FedAvg that may
            # have followed its previous step: the copy follows the averaged weights.
            clients.update_momentum_copies(pool, method.client_momentum)
        precision.begin_step()
        clients.zero_grad(pool)
        with precision.autocast():
            smashed = clients.forward([crops[k] for k in method.trainable_crops], pool, batch.rows_per_client)
            sent = method.trainable_crops if method.gradient_crops is None else method.gradient_crops
            server_inputs = [s.detach().requires_grad_(send_gradients and crop in sent)
                             for crop, s in zip(method.trainable_crops, smashed)]
            momentum_smashed = (clients.momentum_forward([crops[k] for k in method.momentum_crops], pool,
                                                         batch.rows_per_client) if method.momentum_crops else [])
        if record is not None:
            record(server_inputs, momentum_smashed)
        loss, stats = self.server_step(server_inputs, momentum_smashed, layout or StepLayout.of(pool, batch.rows_per_client),
                                       epoch, global_step, row_share)
        if send_gradients:
            gradients = [s.grad for s in server_inputs]
            if self.runtime.world_size > 1:
                # The smashed rows' gradients are not averaged by DDP: undo the world-size factor of the weight.
                gradients = [g / self.runtime.world_size if g is not None else None for g in gradients]
            if self.defences:
                defended = SmashedStep(server_inputs, [crops[k] for k in method.trainable_crops], gradients,
                                       batch.rows_per_client, epoch, row_share)
                gradients, stats = self.defend(defended, stats)
            clients.backward(gradients)
            clients.step(pool, precision.scaler)
        else:
            clients.forget_outputs()
        precision.end_step(self.server_optimizer)
        method.after_server_step()
        return loss, stats

    def defend(self, step: SmashedStep, stats: dict[str, Tensor]) -> tuple[list[Tensor | None], dict[str, Tensor]]:
        """The gradients the clients receive: the server's plus every defence's extra gradient (where the server
        sends one), and the step's statistics with the defences'."""
        gradients = list(step.server_gradients)
        for defence in self.defences:
            extra, defence_stats = defence.client_gradients(step)
            for k, gradient in enumerate(extra):
                if gradient is not None and gradients[k] is not None:
                    # Scaled like the server's gradients (fp16), which the clients' step unscales.
                    gradients[k] = gradients[k] + self.precision.scaler.scale(gradient).to(gradients[k].dtype)
            stats = {**stats, **defence_stats}
        return gradients, stats

    def replay(self, server_inputs: list[Tensor], momentum_smashed: list[Tensor], layout: StepLayout, epoch: int,
               global_step: int, row_share: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        """A server-only step on smashed data the clients sent earlier (MocoSFL's replay epochs): no client works."""
        self.precision.begin_step()
        loss, stats = self.server_step([x.detach() for x in server_inputs], momentum_smashed, layout, epoch,
                                       global_step, row_share)
        self.precision.end_step(self.server_optimizer)
        self.method.after_server_step()
        return loss, stats

    def server_step(self, server_inputs: list[Tensor], momentum_smashed: list[Tensor], layout: StepLayout,
                    epoch: int, global_step: int, row_share: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The server's half: the method's loss on the smashed rows, one backward, one server update."""
        method, precision = self.method, self.precision
        method.start_server_step()
        self.server_optimizer.zero_grad(set_to_none=True)
        if self.per_client_server_updates:
            loss, stats = self._per_client_server_updates(server_inputs, momentum_smashed, layout, epoch,
                                                          global_step)
        else:
            with precision.autocast():
                loss, stats = method.compute_loss(server_inputs, momentum_smashed,
                                                  StepContext(epoch, layout, row_share))
            # DDP averages the server gradients over ranks; weighting each rank's mean loss by its share of the
            # step's rows (times the world size) makes that average the gradient of the global mean loss.
            world_size = self.runtime.world_size
            backward_loss = loss * (world_size * row_share) if world_size > 1 else loss
            precision.scaler.scale(backward_loss).backward()
            method.before_server_step(global_step)
            precision.scaler.step(self.server_optimizer)
        return loss.detach(), {name: value.detach() for name, value in stats.items()}

    def _per_client_server_updates(self, server_inputs: list[Tensor], momentum_smashed: list[Tensor],
                                   layout: StepLayout, epoch: int,
                                   global_step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The seed's 2023-07-27 variant (ablation): one loss and one server step per client, in pool order (one
        process: the trainer refuses it under torchrun)."""
        losses = []
        stats: dict[str, Tensor] = {}
        for client, begin, end in layout.local_blocks():
            rows = slice(begin, end)
            self.server_optimizer.zero_grad(set_to_none=True)
            context = StepContext(epoch, StepLayout.of([client], [end - begin]))
            with self.precision.autocast():
                loss, stats = self.method.compute_loss([x[rows] for x in server_inputs],
                                                       [x[rows] for x in momentum_smashed], context)
            loss.backward()  # gradient rows of this client accumulate into server_inputs[k].grad[rows]
            self.method.before_server_step(global_step)
            self.server_optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean(), stats


def build_split_step(args: argparse.Namespace, runtime: Runtime, precision: MixedPrecision, *,
                     engine: str = "auto") -> SplitStep:
    """The network of the options split at --cutlayer, the method around its server part, the client engine
    (--client_exec; `engine` chooses inside the vectorised one) and the server optimizer."""
    method_cls = method_class(args.method)
    split = build_split_model(args.arch, args.cutlayer, head=method_cls.head_builder(args), use_ws=not args.disable_WS,
                              client_residual=not args.disable_c_residual, width=args.width,
                              bottleneck=bottleneck_of(args), image_size=args.data_size)
    if args.initialze_path != "None":
        # Before the clients and the method copy the parts.
        load_initial_weights(InitialWeightsOptions.from_args(args), split)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    # Before the method copies the server (MoCo's key encoder), so every copy has the same layout.
    method = method_cls(args, split.server.to(runtime.device, memory_format=memory_format), runtime.device)
    if args.compile:
        # In place, so parameter names (and checkpoints) stay those of the plain module.
        method.server.compile()
    if runtime.is_distributed:
        method.distribute(runtime)  # before the optimizer: BatchNorm layers are replaced
    clients = build_client_engine(split.client, typed_options(ClientEngineOptions, args), runtime.device,
                                  keep_momentum_copies=method.client_momentum > 0,
                                  engine=engine, memory_format=memory_format)
    server_optimizer = torch.optim.SGD(method.optimized_parameters(), lr=args.lr, momentum=args.momentum,
                                       weight_decay=args.weight_decay)
    return SplitStep(method, clients, server_optimizer, precision, runtime, memory_format,
                     per_client_server_updates=per_client_server_updates(args))
