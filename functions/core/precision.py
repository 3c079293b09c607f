"""Mixed precision of a run (--use_fp16): the autocast type, the GradScaler shared by server and clients, and the
count of the steps whose update the scaler skipped."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, ContextManager

import torch
import torch.distributed as dist

from functions.core.distributed import Runtime
from functions.core.errors import UserError

# Below this fp16 loss scale even unscaled gradients overflow: the run has diverged, skipping steps cannot save it.
MIN_LOSS_SCALE = 1.0
logger = logging.getLogger("sfl")


def amp_dtype_of(use_fp16: bool, amp_dtype: str, runtime: Runtime) -> torch.dtype | None:
    """The autocast type of --use_fp16 --amp_dtype, or None (full precision; with a warning off CUDA)."""
    if not use_fp16:
        return None
    if not runtime.is_cuda:
        logger.warning("--use_fp16 needs CUDA: training in full precision on %s", runtime.device)
        return None
    return torch.bfloat16 if amp_dtype == "bf16" else torch.float16


class MixedPrecision:
    """Autocast, loss scaling (fp16 only) and the skipped-step count, without host synchronisation per step."""

    def __init__(self, amp_dtype: torch.dtype | None, runtime: Runtime) -> None:
        """amp_dtype: the autocast type (float16 adds loss scaling), or None for full precision."""
        self.runtime = runtime
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=self.amp_dtype == torch.float16)
        # Steps whose update the GradScaler skipped (inf/NaN gradients), counted on the device: read at log points.
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=runtime.device)
        self._scale_before: torch.Tensor | None = None

    @property
    def scaling(self) -> bool:
        """Whether fp16 loss scaling is on."""
        return self.scaler.is_enabled()

    def autocast(self) -> ContextManager:
        """The autocast context of the forward passes (a no-op in full precision)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.amp_dtype)

    def begin_step(self) -> None:
        """Remember the loss scale, to count this step as skipped if the scaler lowers it."""
        self._scale_before = self._loss_scale() if self.scaling else None

    def end_step(self, server_optimizer: torch.optim.Optimizer) -> None:
        """After every optimizer stepped: agree on overflows over ranks, update the scale, count a skipped step."""
        if self.runtime.is_distributed and self.scaling:
            self._agree_on_overflow(server_optimizer)
        self.scaler.update()
        if self._scale_before is not None:
            # The scaler lowers its scale exactly when some optimizer found inf/NaN gradients and skipped its step.
            self.skipped_steps += (self._loss_scale() < self._scale_before).long()

    def check(self, global_step: int, last_good: str) -> tuple[int, float]:
        """(skipped steps, loss scale) now; a UserError when the scale shows that the run diverged."""
        skipped, scale = int(self.skipped_steps), float(self.scaler.get_scale())
        if scale < MIN_LOSS_SCALE:
            raise UserError(f"the fp16 loss scale fell to {scale:.3g} by step {global_step} ({skipped} steps "
                            f"skipped): gradients overflow even unscaled; {last_good} "
                            "(try a lower --lr or --amp_dtype bf16)")
        return skipped, scale

    def _agree_on_overflow(self, server_optimizer: torch.optim.Optimizer) -> None:
        """fp16 under torchrun: every rank lowers its loss scale when any rank's optimizers met inf/NaN."""
        device = self.runtime.device
        states: dict[int, Any] = getattr(self.scaler, "_per_optimizer_states", {})
        found = [flag for state in states.values() for flag in state.get("found_inf_per_device", {}).values()]
        local = (torch.stack([flag.to(device).float().sum() for flag in found]).sum() if found
                 else torch.zeros((), device=device)).reshape(1)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        server_flags = states.get(id(server_optimizer), {}).get("found_inf_per_device", {})
        for flag in server_flags.values():
            flag.copy_(torch.maximum(flag, (local > 0).to(flag.dtype).to(flag.device).reshape(flag.shape)))
            break

    def _loss_scale(self) -> torch.Tensor:
        """The GradScaler's current scale as a device tensor (a copy), read without a host synchronisation."""
        scale = getattr(self.scaler, "_scale", None)
        if isinstance(scale, torch.Tensor):
            return scale.detach().clone()
        # Before its first step the scaler has no tensor yet; its scale is then the initial one (no sync either).
        return torch.tensor(self.scaler.get_scale(), dtype=torch.float32, device=self.runtime.device)
