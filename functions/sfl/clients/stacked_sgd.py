"""SGD on per-client weights stacked along dim 0, updating only the rows of the clients in the pool."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor


def view_as_rows(mask: Tensor, like: Tensor) -> Tensor:
    """A (P,) mask reshaped to broadcast over the (P, ...) tensor `like`."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


class StackedSGD(torch.optim.Optimizer):
    """SGD on stacked per-client tensors (num_client, ...): updates only the rows in `pool_index`.

    Equal, row by row, to one `torch.optim.SGD(lr, momentum, weight_decay)` per client (dampening 0, no
    Nesterov). Set `pool_index` (a LongTensor of client ids on the parameters' device) before `step`; `row_lr`
    (one rate per client, float64 on that device) replaces the group's lr when set.
    """

    # GradScaler then hands over `grad_scale` and `found_inf` instead of skipping the whole step itself.
    _step_supports_amp_scaling = True

    def __init__(self, params: Sequence[Tensor], *, lr: float, momentum: float, weight_decay: float) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=0, weight_decay=weight_decay, nesterov=False)
        super().__init__(list(params), defaults)
        self.pool_index: Tensor | None = None
        self.row_lr: Tensor | None = None

    def _buffers_of(self, parameter: Tensor) -> tuple[Tensor, Tensor]:
        """(momentum buffers, has-stepped flags) of a stacked parameter, created as zeros / False on first use."""
        state = self.state[parameter]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            state["stepped"] = torch.zeros(parameter.shape[0], dtype=torch.bool, device=parameter.device)
        return state["momentum_buffer"], state["stepped"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SGD step of the clients in `pool_index`; other rows are untouched."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pool_index is None:
            raise RuntimeError("StackedSGD.step needs pool_index (the client ids to update)")
        pool = self.pool_index
        # Set by an enabled GradScaler: grad_scale is None when unscale_ already ran on these gradients.
        under_scaler = hasattr(self, "found_inf")
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            parameters = [p for p in group["params"] if p.grad is not None]
            if not parameters:
                continue
            if grad_scale is not None:
                inv_scale = grad_scale.double().reciprocal().float()
                for parameter in parameters:
                    # In place, as GradScaler.unscale_ leaves the loop's client gradients.
                    parameter.grad.mul_(inv_scale.to(parameter.grad.device))
            grads = [p.grad.index_select(0, pool) for p in parameters]
            finite: Tensor | None = None
            if under_scaler:
                # Per client: a client with an inf/NaN gradient skips its update, the others step.
                finite = torch.stack([g.reshape(g.shape[0], -1).isfinite().all(dim=1) for g in grads]).all(dim=0)
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            pool_lr = None if self.row_lr is None else self.row_lr.index_select(0, pool)
            for parameter, grad in zip(parameters, grads):
                weights = parameter.index_select(0, pool)
                if weight_decay != 0:
                    grad = grad.add(weights, alpha=weight_decay)
                if momentum != 0:
                    buffers, stepped = self._buffers_of(parameter)
                    # A zero buffer gives momentum * 0 + grad = grad, torch.optim.SGD's first-step buffer.
                    new_buffer = buffers.index_select(0, pool).mul_(momentum).add_(grad)
                    if finite is not None:
                        new_buffer = torch.where(view_as_rows(finite, new_buffer), new_buffer,
                                                 buffers.index_select(0, pool))
                        stepped.index_copy_(0, pool, stepped.index_select(0, pool) | finite)
                    else:
                        stepped.index_fill_(0, pool, True)
                    buffers.index_copy_(0, pool, new_buffer)
                    grad = new_buffer
                if pool_lr is None:
                    new_weights = weights.add(grad, alpha=-lr)
                else:
                    new_weights = weights - view_as_rows(pool_lr, grad).to(grad.dtype) * grad
                if finite is not None:
                    new_weights = torch.where(view_as_rows(finite, new_weights), new_weights, weights)
                parameter.index_copy_(0, pool, new_weights)
        return loss
