"""SwAV's losses as pure functions and small state classes (Caron et al.): Sinkhorn-Knopp equipartition in
float32 (optionally global over all ranks), the swapped prediction loss, collapse monitors and the per-crop
embedding queue."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from functions.core.errors import UserError


def _logsumexp_over_samples(values: Tensor, distributed: bool) -> Tensor:
    """log sum_b exp(values[b, k]) for each column k, the sum running over every rank's rows when distributed."""
    # A rank may hold no rows this step; it must still take part in the all-reduces.
    column_max = values.amax(dim=0) if values.shape[0] > 0 else values.new_full(values.shape[1:], -math.inf)
    if distributed:
        dist.all_reduce(column_max, op=dist.ReduceOp.MAX)
    # A column that is -inf everywhere would give inf - inf; shifting it by 0 keeps it at -inf instead.
    column_max = torch.where(torch.isfinite(column_max), column_max, torch.zeros_like(column_max))
    column_sum = torch.exp(values - column_max).sum(dim=0)
    if distributed:
        dist.all_reduce(column_sum)
    return torch.log(column_sum) + column_max


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float, iterations: int, *, distributed: bool = False) -> Tensor:
    """Soft equipartitioned codes Q (B, K) for scores (B, K) by Sinkhorn-Knopp; each row sums to 1.

    Q is proportional to exp(scores / epsilon) rescaled by one factor per prototype and one per sample.
    Each iteration first rescales prototypes so that each column sums to B / K, then samples so that each
    row sums to 1 (SwAV's order), so after the last iteration rows sum to 1 exactly and columns to about
    B / K. ``iterations=0`` gives the row softmax of scores / epsilon.

    The scaling factors are kept as logarithms and every normalisation is a log-sum-exp, which subtracts
    the largest value before exp: fp16/bf16 scores and large scores / epsilon can neither overflow nor
    underflow a whole row to zero. The work is done in float32 with autocast disabled.

    distributed=True needs an initialised torch.distributed process group; then B is the total number
    of rows over all ranks and every sum (and max) over samples is all-reduced, so the equipartition is
    global over all ranks' rows while each rank returns the codes of its own rows. Returns float32 codes.
    """
    if not epsilon > 0:
        raise UserError(f"the Sinkhorn epsilon must be > 0 (got {epsilon}); set --epsilon to a positive value such as 0.05")
    if iterations < 0:
        raise UserError(f"the number of Sinkhorn iterations must be >= 0 (got {iterations}); set --sinkhorn_iterations to 3")
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K); got {tuple(scores.shape)}")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sinkhorn_knopp(distributed=True) needs an initialised torch.distributed process group")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        log_kernel = scores.detach().float() / epsilon
        num_prototypes = log_kernel.shape[1]
        total_samples = torch.tensor(float(log_kernel.shape[0]), device=log_kernel.device)
        if distributed:
            # Ranks may hold different numbers of rows (uneven client shards), so B is summed, not assumed.
            dist.all_reduce(total_samples)
        log_prototype_mass = torch.log(total_samples) - math.log(num_prototypes)
        log_sample_scale = torch.zeros(log_kernel.shape[0], 1, device=log_kernel.device)
        log_prototype_scale = torch.zeros(1, num_prototypes, device=log_kernel.device)
        for _ in range(iterations):
            column_lse = _logsumexp_over_samples(log_kernel + log_sample_scale, distributed)
            log_prototype_scale = (log_prototype_mass - column_lse).unsqueeze(0)
            # Sample sums are local to each rank: a row lives on exactly one rank.
            log_sample_scale = -torch.logsumexp(log_kernel + log_prototype_scale, dim=1, keepdim=True)
        # The last step of every iteration is the sample normalisation, i.e. a row softmax.
        return torch.softmax(log_kernel + log_prototype_scale, dim=1)


def _check_temperature(temperature: float) -> None:
    """Reject a temperature that would divide by zero or flip the scores."""
    if not temperature > 0:
        raise UserError(f"the SwAV temperature must be > 0 (got {temperature}); set --temperature to a positive value such as 0.1")


def swapped_prediction_loss(scores: Sequence[Tensor], codes: Mapping[int, Tensor], temperature: float) -> Tensor:
    """SwAV swapped prediction: mean over assignment crops i and other crops v != i of -sum q_i log softmax(s_v / T).

    scores: one (B, K) prototype-score tensor per crop, in crop order. codes: {crop_index: (B, K)} codes of
    the crops used for assignment (targets, no gradient). For each pair the cross-entropy is averaged over
    the B samples; log_softmax runs in float32 with autocast disabled. Returns a float32 scalar.
    """
    _check_temperature(temperature)
    num_crops = len(scores)
    if num_crops < 2:
        raise ValueError(f"swapped prediction needs at least 2 crops; got {num_crops}")
    if not codes:
        raise ValueError("swapped prediction needs codes for at least one assignment crop")
    for crop_index, crop_codes in codes.items():
        if not 0 <= crop_index < num_crops:
            raise ValueError(f"codes given for crop {crop_index} but there are only {num_crops} crops")
        if crop_codes.shape != scores[crop_index].shape:
            raise ValueError(
                f"codes of crop {crop_index} are {tuple(crop_codes.shape)} but its scores are {tuple(scores[crop_index].shape)}"
            )
    with torch.autocast(device_type=scores[0].device.type, enabled=False):
        log_predictions = [F.log_softmax(crop_scores.float() / temperature, dim=1) for crop_scores in scores]
        total = scores[0].new_zeros((), dtype=torch.float32)
        for crop_index, crop_codes in codes.items():
            targets = crop_codes.detach().float()
            pair_losses = [
                -(targets * log_predictions[other]).sum(dim=1).mean() for other in range(num_crops) if other != crop_index
            ]
            total = total + torch.stack(pair_losses).mean()
        return total / len(codes)


def seed_fork_accumulated_loss(client_losses: Sequence[Tensor], num_crops_for_assign: int) -> Tensor:
    """The seed fork's step loss: the sum over clients c of a_c = a_(c-1) / num_crops_for_assign + l_c (a_(-1) = 0)."""
    # The fork divided a per-client sum by the number of assignment crops but never reset it between clients, so
    # with 2 assignment crops its total for clients 0, 1 is l0 + (l0/2 + l1); kept only for --compat mocosfl.
    running = total = client_losses[0].new_zeros(())
    for client_loss in client_losses:
        running = running / num_crops_for_assign + client_loss
        total = total + running
    return total


def code_entropy(codes: Tensor) -> Tensor:
    """Mean entropy (nats) of the per-sample codes."""
    codes_fp32 = codes.detach().float()
    # xlogy gives 0 * log 0 = 0, so one-hot codes have entropy 0 instead of NaN.
    return -torch.xlogy(codes_fp32, codes_fp32).sum(dim=1).mean()


def prototypes_used(codes: Tensor) -> Tensor:
    """Number of distinct prototypes that are some sample's argmax code."""
    winners = codes.detach().argmax(dim=1)
    return (torch.bincount(winners, minlength=codes.shape[1]) > 0).sum()


def embedding_std(embeddings: Tensor) -> Tensor:
    """Mean over dimensions of the per-dimension std of L2-normalised embeddings (near 0 = collapse, ~1/sqrt(D) healthy)."""
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"embedding_std needs (N, D) embeddings with N >= 2; got {tuple(embeddings.shape)}")
    unit = F.normalize(embeddings.detach().float(), dim=1)
    return unit.std(dim=0).mean()


class EmbeddingQueue:
    """Per assignment crop, the last `length` embeddings (SwAV queue), newest first.

    ``embeddings`` is (num_crops_for_assign, length, dim) float32, zero at start; slot i belongs to the i-th
    crop used for assignment. One step of the method, for each slot i and its crop's batch:

        scores = queue.scores_with_queue(i, batch_scores, prototypes)   # (length + B, K) once full
        queue.push(i, batch_embeddings)
        codes = sinkhorn_knopp(scores, epsilon, iterations)[-B:]        # the batch rows come last

    Push the same (normalised) embeddings that the prototypes score. A slot is used once it is full,
    i.e. once ``length`` rows have been pushed into it, like SwAV's test on its last row.
    """

    def __init__(
        self, num_crops_for_assign: int, length: int, dim: int, device: torch.device | str | None = None
    ) -> None:
        if num_crops_for_assign < 1:
            raise UserError(f"SwAV needs at least one crop for assignment (got {num_crops_for_assign}); check --crops_for_assign")
        if length < 1:
            raise UserError(f"the SwAV queue length must be >= 1 (got {length}); set --queue_length to a positive value or 0 for no queue")
        if dim < 1:
            raise UserError(f"the SwAV feature dimension must be >= 1 (got {dim}); check --feat_dim")
        self.num_slots = num_crops_for_assign
        self.length = length
        self.dim = dim
        self.embeddings: Tensor = torch.zeros(num_crops_for_assign, length, dim, device=device)
        # Rows pushed so far per slot, capped at length.
        self.filled: Tensor = torch.zeros(num_crops_for_assign, dtype=torch.long)

    def _check_slot(self, slot: int) -> None:
        """Reject a slot index outside the queue."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"queue slot {slot} is outside [0, {self.num_slots})")

    def is_full(self, slot: int | None = None) -> bool:
        """Whether the slot (or, with None, every slot) holds `length` pushed embeddings and so is used."""
        if slot is None:
            return bool((self.filled >= self.length).all())
        self._check_slot(slot)
        return int(self.filled[slot]) >= self.length

    @torch.no_grad()
    def scores_with_queue(self, slot: int, batch_scores: Tensor, prototypes: nn.Linear) -> Tensor:
        """Assignment scores: cat(prototypes(queue rows), batch_scores) when the slot is full, else batch_scores.

        Returns a detached float32 (length + B, K) or (B, K) tensor with the batch rows last.
        """
        self._check_slot(slot)
        batch_scores = batch_scores.detach().float()
        if not self.is_full(slot):
            return batch_scores
        weight = prototypes.weight.detach().float()
        bias = prototypes.bias.detach().float() if prototypes.bias is not None else None
        with torch.autocast(device_type=self.embeddings.device.type, enabled=False):
            queue_scores = F.linear(self.embeddings[slot].to(weight.device), weight, bias)
        return torch.cat([queue_scores.to(batch_scores.device), batch_scores], dim=0)

    @torch.no_grad()
    def push(self, slot: int, embeddings: Tensor) -> None:
        """Put the (B, dim) batch embeddings (detached) at the top of the slot in batch order, shifting older rows out.

        The new slot is cat(embeddings, old rows)[:length], so a batch longer than the queue keeps its first rows.
        """
        self._check_slot(slot)
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (B, {self.dim}); got {tuple(embeddings.shape)}")
        incoming = embeddings.detach().to(self.embeddings.device, torch.float32)[: self.length]
        count = incoming.shape[0]
        # Shift older rows down first (clone: source and destination overlap), then write the batch on top.
        self.embeddings[slot, count:] = self.embeddings[slot, : self.length - count].clone()
        self.embeddings[slot, :count] = incoming
        self.filled[slot] = min(int(self.filled[slot]) + count, self.length)

    def state_dict(self) -> dict:
        """The queue contents and fill counts, for checkpoints."""
        return {"embeddings": self.embeddings.detach().clone(), "filled": self.filled.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore contents and fill counts saved by ``state_dict``; the queue shape must match."""
        embeddings = state["embeddings"]
        expected = (self.num_slots, self.length, self.dim)
        if tuple(embeddings.shape) != expected:
            raise UserError(
                f"the checkpoint's SwAV queue is {tuple(embeddings.shape)} but this run expects {expected};"
                " resume with the same --queue_length, --crops_for_assign, --feat_dim and number of processes"
            )
        self.embeddings.copy_(embeddings.to(self.embeddings.device, torch.float32))
        self.filled.copy_(torch.as_tensor(state["filled"], dtype=torch.long).clamp(0, self.length))


def resolution_groups(crops: Sequence[Tensor]) -> list[Tensor]:
    """Consecutive crops of the same spatial size concatenated (one server pass per resolution), order kept."""
    groups: list[list[Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return [torch.cat(group) for group in groups]
