"""ResSFL (--defence ressfl, or --enable_ressfl): attacker-aware training of the client parts.

A simulated attacker (an inversion decoder, --MIA_arch) learns during training to rebuild the clients' images
from their smashed data (Adam, loss = -SSIM, as in MocoSFL); each client's loss then gets ResSFL's penalty,
--ressfl_alpha times how far the attacker's SSIM on that client's rows exceeds --ressfl_target_ssim, so its
gradient pushes the client towards smashed data the attacker cannot invert. The decoder and its optimizer are
part of the checkpoint.

MocoSFL keeps one decoder per client and trains each pool member's decoder on the whole step's rows; here one
decoder (the same under torchrun: its gradients and BatchNorm statistics are averaged over the ranks) learns from
every step's rows, and each client is penalised by the SSIM on its own rows, weighted by its share of the step's
rows (for one client: MocoSFL's alpha * (SSIM - target)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from functions.privacy.defences import DefenceSetting, PrivacyDefence, SmashedStep, register_defence
from functions.privacy.image_quality import ssim_per_image
from functions.sfl.clients.loop import query_index
from models.decoders import inversion_decoder, xavier_initialise

# The simulated attacker's learning rate and its decay (MocoSFL: Adam 1e-3, x0.2 at epochs 60, 120 and 160).
ATTACKER_LR = 1e-3
ATTACKER_DECAY = 0.2
ATTACKER_MILESTONES = (60, 120, 160)


# MocoSFL's simulated attacker uses GroupNorm and weight-standardised convolutions below this batch size.
GROUP_NORM_BELOW_BATCH = 20


@dataclass(frozen=True)
class ResSFLOptions:
    """The run options ResSFL reads."""

    ressfl_alpha: float
    ressfl_target_ssim: float
    MIA_arch: str
    seed: int
    batch_size: int
    client_sample_ratio: float


def per_image_ssim(reconstructed: Tensor, originals: Tensor) -> Tensor:
    """SSIM of every reconstruction against its original, (B, 3, H, W) in [0, 1] -> (B,), in MocoSFL's convention
    (functions.image_quality): --ressfl_target_ssim is a value on MocoSFL's scale."""
    return ssim_per_image(reconstructed, originals)


def ressfl_penalty(ssim: Tensor, target_ssim: float, alpha: float) -> Tensor:
    """ResSFL's client penalty: alpha * (SSIM - target) where the SSIM exceeds the target, else zero (target 0: alpha * SSIM)."""
    if target_ssim <= 0:
        return alpha * ssim
    return alpha * torch.relu(ssim - target_ssim)


def client_penalty(image_ssim: Tensor, rows_per_client: Sequence[int], target_ssim: float, alpha: float,
                   row_share: float = 1.0) -> Tensor:
    """The step's total penalty: each client's ressfl_penalty of its mean SSIM, weighted by its share of the step's
    rows (row_share: this process's fraction of them under torchrun)."""
    offsets = query_index(rows_per_client)
    total_rows = offsets[-1] / row_share
    penalties = [ressfl_penalty(image_ssim[start:end].mean(), target_ssim, alpha) * ((end - start) / total_rows)
                 for start, end in zip(offsets[:-1], offsets[1:]) if end > start]
    return torch.stack(penalties).sum()


def _client_output_shape(client: nn.Module, image_size: int, device: torch.device) -> torch.Size:
    """Shape of the smashed data of one image of image_size pixels."""
    with torch.no_grad():
        return client(torch.zeros(1, 3, image_size, image_size, device=device)).shape


class SimulatedAttacker:
    """ResSFL's attacker and penalty: train the decoder on a step's smashed rows, then give the gradient of the
    clients' penalty with respect to those rows."""

    def __init__(self, options: ResSFLOptions, client: nn.Module, image_size: int, mean: Sequence[float],
                 std: Sequence[float], device: torch.device, distributed: bool = False) -> None:
        self.alpha = float(options.ressfl_alpha)
        self.target_ssim = float(options.ressfl_target_ssim)
        self.device = device
        self.distributed = distributed
        shape = _client_output_shape(client, image_size, device)
        # Its own seed: the decoder's draws leave the run's random stream as it would be without ResSFL. As in
        # MocoSFL: --MIA_arch as named (custom: its small custom decoder), GroupNorm for small client batches,
        # Xavier-initialised plain convolutions.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            self.decoder = xavier_initialise(inversion_decoder(
                options.MIA_arch, shape[1], shape[-1], image_size,
                group_norm=options.batch_size < GROUP_NORM_BELOW_BATCH)).to(device)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=ATTACKER_LR)
        # MocoSFL stretches the milestones when only part of the clients work per epoch.
        stretch = 1.0 / options.client_sample_ratio if options.client_sample_ratio < 1.0 else 1.0
        self.milestones = tuple(int(m * stretch) for m in ATTACKER_MILESTONES)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def learning_rate(self, epoch: int) -> float:
        """The decoder's learning rate in (0-based) `epoch`."""
        return ATTACKER_LR * ATTACKER_DECAY ** sum(epoch >= m for m in self.milestones)

    def _average_over_ranks(self) -> None:
        """Every rank's decoder gradients and BatchNorm statistics replaced by their mean over the ranks."""
        world = dist.get_world_size()
        tensors = [p.grad for p in self.decoder.parameters() if p.grad is not None]
        tensors += [b for b in self.decoder.buffers() if b.is_floating_point()]
        for tensor in tensors:
            dist.all_reduce(tensor)
            tensor.div_(world)

    def __call__(self, smashed: Tensor, images: Tensor, rows_per_client: Sequence[int], epoch: int,
                 row_share: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        """One attacker update on (smashed, images), then the gradient of the clients' penalty w.r.t. `smashed`
        (zero where every client is below the target) and the step's statistics. `images` are the client's
        normalised inputs, `smashed` its outputs for them (rows grouped by client)."""
        originals = (images.float() * self.std + self.mean).clamp(0, 1)
        rows = smashed.detach().float()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(epoch)
        self.decoder.train()
        with torch.autocast(self.device.type, enabled=False):
            attacker_ssim = per_image_ssim(self.decoder(rows), originals).mean()
            self.optimizer.zero_grad(set_to_none=True)
            (-attacker_ssim).backward()
            if self.distributed:
                self._average_over_ranks()
            self.optimizer.step()
            # The client's side of the game: the attacker as it is now, its statistics frozen (MocoSFL: eval mode).
            self.decoder.eval()
            rows.requires_grad_(True)
            image_ssim = per_image_ssim(self.decoder(rows), originals)
            penalty = client_penalty(image_ssim, rows_per_client, self.target_ssim, self.alpha, row_share)
            (gradient,) = torch.autograd.grad(penalty, rows)
        self.decoder.zero_grad(set_to_none=True)
        # The penalty as if these rows were the whole step: the loop's row-share-weighted mean over ranks sums it.
        stats = {"ressfl_attacker_ssim": attacker_ssim.detach(), "ressfl_client_ssim": image_ssim.detach().mean(),
                 "ressfl_penalty": penalty.detach() / row_share}
        return gradient.to(smashed.dtype), stats

    def state_dict(self) -> dict:
        return {"decoder": self.decoder.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])


@register_defence("ressfl")
class ResSFL(PrivacyDefence):
    """ResSFL as a defence of the step: the simulated attacker trains on the smashed data of the method's first
    trainable crop, and its penalty's gradient joins the server's (steps where that crop sends gradients only)."""

    options_type = ResSFLOptions

    def __init__(self, options: ResSFLOptions, setting: DefenceSetting) -> None:
        super().__init__(options, setting)
        self.attacker = SimulatedAttacker(options, setting.client, setting.image_size, setting.mean, setting.std,
                                          setting.device, distributed=setting.distributed)

    def client_gradients(self, step: SmashedStep) -> tuple[list[Tensor | None], dict[str, Tensor]]:
        extra: list[Tensor | None] = [None] * len(step.smashed)
        if step.server_gradients[0] is None:
            return extra, {}
        extra[0], stats = self.attacker(step.smashed[0], step.images[0], step.rows_per_client, step.epoch,
                                        step.row_share)
        return extra, stats

    def state_dict(self) -> dict:
        return self.attacker.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.attacker.load_state_dict(state)
