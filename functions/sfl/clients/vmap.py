"""The client side of one process with every client's weights stacked: one vectorised pass over the pool.

`VectorisedClientSide` has the interface and the semantics of `functions.sfl.clients.loop.ClientSide` (the loop),
but client c's parameter `name` is row c of one stacked tensor of shape (num_client, *shape), and a forward runs the
whole pool at once, so the cost of a step no longer grows with a Python loop over clients. Two engines:

* "grouped" (used when the client model is made of convolutions, GroupNorm and units that declare
  `channel_packable`, such as the ResNet, VGG and MobileNetV2 units of models/: ReLU, residual additions,
  max-pooling): the pool's activations are packed along channels, (rows, clients * channels, H, W); every
  convolution becomes one grouped convolution (groups = clients x the convolution's own groups, so depthwise
  convolutions pack too) and every GroupNorm one GroupNorm with clients * groups groups, so the modules' own
  forward code runs unchanged on the packed tensor.
* "vmap" (any other client model): `torch.func.functional_call` under `torch.vmap` over the stacked weights.

Both give the loop's numbers up to float rounding; "grouped" avoids the layout changes vmap inserts between
operations (about 1.3-2x faster for the client part on CPU).

Rows per client. Every client is independent of the others' rows (GroupNorm, no batch statistics), so a client
may be fed extra rows without changing its real outputs. Clients are grouped by row count; each group is one
pass. When the pool has more than `MAX_ROW_GROUPS` distinct row counts, each client is padded up to the next
power of two of its row count instead (at most log2(max rows) + 1 passes, less than 2x padded work). Padded rows
repeat one of the client's real rows, are dropped from the output, and receive no gradient. Crops of the same
shape (e.g. MoCo's two 32-pixel views) share one pass; crops of another resolution (SwAV's small crops) get
their own.

Optimiser. `StackedSGD` (functions/sfl/clients/stacked_sgd.py) is a `torch.optim.Optimizer` whose param groups hold the stacked tensors, so the shared
`torch.amp.GradScaler` can step it. It updates only the pool's rows, exactly as one `torch.optim.SGD` per
client would (weight decay, momentum, lazily created momentum buffers); clients outside the pool neither move
nor decay. Under an enabled GradScaler it unscales the gradients itself and skips, per client, the update of a
client whose gradients are not finite (as the loop skips that client's optimizer), all without a host
synchronisation.

Checkpoints. `state_dict` / `load_state_dict` use the loop's format (lists of per-client state dicts, one
`torch.optim.SGD` state dict per client), so a run can move between `--client_exec loop` and `vmap`.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from functions.core.errors import UserError
from functions.sfl.clients.loop import query_index
from functions.sfl.clients.stacked_sgd import StackedSGD
from models.layers import WSConv2d, standardize_kernel

__all__ = ["VectorisedClientSide", "StackedSGD", "MAX_ROW_GROUPS", "ENGINES", "can_pack"]

ENGINES = ("auto", "grouped", "vmap")

# More distinct row counts than this in one pool: bucket by powers of two instead of one pass per count.
MAX_ROW_GROUPS = 4
# Index plans are rebuilt only when the pool or the row counts change (once per epoch in the training loop).
_PLAN_CACHE_SIZE = 8


# Containers whose forward only calls their children, element-wise ops (ReLU, addition) and channel-wise ones
# (max-pooling): they run unchanged on channel-packed activations once their convolutions and norms are swapped
# for the packed versions below. A backbone's own unit classes join them by declaring `channel_packable = True` in
# their class body.
_PACKABLE_CONTAINERS = (nn.Sequential, nn.Identity, nn.ReLU)


def _is_packable_container(module: nn.Module) -> bool:
    """A container the grouped engine can run: a plain one, or a class that declares itself channel-packable."""
    return type(module) in _PACKABLE_CONTAINERS or type(module).__dict__.get("channel_packable", False) is True


def can_pack(template: nn.Module) -> bool:
    """Whether the "grouped" engine can run `template`: only convolutions, GroupNorm and channel-packable units."""
    for module in template.modules():
        if _is_packable_container(module):
            continue
        if type(module) in (nn.Conv2d, WSConv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            continue
        if type(module) is nn.GroupNorm:
            continue
        return False
    return True


class _PackedConv2d(nn.Module):
    """A convolution over channel-packed clients: weight (clients, out, in/groups, k, k) -> one grouped convolution."""

    def __init__(self, conv: nn.Conv2d, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.memory_format = memory_format
        # Placeholders with the original names: functional_call substitutes the stacked tensors.
        self.weight = nn.Parameter(torch.empty(0, *conv.weight.shape, device=conv.weight.device))
        self.bias = None if conv.bias is None else nn.Parameter(torch.empty(0, *conv.bias.shape, device=conv.bias.device))
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.standardise = isinstance(conv, WSConv2d)

    def forward(self, x: Tensor) -> Tensor:
        """x (rows, clients * in, H, W) -> (rows, clients * out, H', W'), each client with its own kernel."""
        clients = self.weight.shape[0]
        kernel = self.weight.flatten(0, 1)
        if self.standardise:
            # The model's own formula; it works per output channel, so packing the clients does not change it.
            kernel = standardize_kernel(kernel)
        bias = None if self.bias is None else self.bias.flatten()
        kernel = kernel.contiguous(memory_format=self.memory_format)
        return F.conv2d(x, kernel, bias, self.stride, self.padding, self.dilation, self.groups * clients)


class _PackedGroupNorm(nn.Module):
    """GroupNorm over channel-packed clients: clients * groups groups, each client with its own affine."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups, self.num_channels, self.eps = norm.num_groups, norm.num_channels, norm.eps
        self.weight = None if norm.weight is None else nn.Parameter(torch.empty(0, *norm.weight.shape))
        self.bias = None if norm.bias is None else nn.Parameter(torch.empty(0, *norm.bias.shape))

    def forward(self, x: Tensor) -> Tensor:
        """Per client and group normalisation of x (rows, clients * channels, H, W), then the client's affine."""
        clients = x.shape[1] // self.num_channels
        weight = None if self.weight is None else self.weight.flatten()
        bias = None if self.bias is None else self.bias.flatten()
        return F.group_norm(x, self.num_groups * clients, weight, bias, self.eps)


def _packed_copy(template: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """The template with every convolution and GroupNorm replaced by its channel-packed version (same names)."""
    if isinstance(template, nn.Conv2d):
        return _PackedConv2d(template, memory_format)
    if isinstance(template, nn.GroupNorm):
        return _PackedGroupNorm(template)
    packed = copy.deepcopy(template)
    for module in list(packed.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d):
                setattr(module, name, _PackedConv2d(child, memory_format))
            elif isinstance(child, nn.GroupNorm):
                setattr(module, name, _PackedGroupNorm(child))
    return packed


class _ClientModules(Sequence[nn.Module]):
    """Read-only per-client modules: item c is a fresh module holding a copy of client c's weights (and grads)."""

    def __init__(self, template: nn.Module, stacked: "OrderedDict[str, Tensor]", count: int,
                 trainable: bool) -> None:
        self._template = template
        self._stacked = stacked
        self._count = count
        self._trainable = trainable

    def __len__(self) -> int:
        return self._count

    def _materialise(self, client: int) -> nn.Module:
        """A copy of the template carrying client `client`'s weights and, if present, its gradients."""
        if not -self._count <= client < self._count:
            raise IndexError(f"client {client} out of range for {self._count} clients")
        module = copy.deepcopy(self._template)
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                stacked = self._stacked[name]
                parameter.copy_(stacked[client])
                parameter.grad = stacked.grad[client].clone() if stacked.grad is not None else None
                parameter.requires_grad_(self._trainable)
        return module

    @overload
    def __getitem__(self, index: int) -> nn.Module: ...

    @overload
    def __getitem__(self, index: slice) -> list[nn.Module]: ...

    def __getitem__(self, index: int | slice) -> nn.Module | list[nn.Module]:
        if isinstance(index, slice):
            return [self._materialise(c) for c in range(self._count)[index]]
        return self._materialise(index)

    def __iter__(self) -> Iterator[nn.Module]:
        return (self._materialise(c) for c in range(self._count))

    def __add__(self, other: Sequence[nn.Module]) -> list[nn.Module]:
        return list(self) + list(other)

    def __radd__(self, other: Sequence[nn.Module]) -> list[nn.Module]:
        return list(other) + list(self)


@dataclass
class _RowGroup:
    """One pass: the clients it serves and which input rows it reads, in the engine's layout."""

    client_index: Tensor | None   # (G,) client ids; None when the group is every client in order
    input_index: Tensor | None    # rows of the crop-concatenated input; None = all of them, in order
    size: int                     # G, the clients in the group
    padded_rows: int              # rows per client and crop after padding


@dataclass
class _ShapePlan:
    """How the crops of one shape are cut into row groups and put back in input row order."""

    crops: list[int]
    groups: list[_RowGroup]
    output_index: Tensor | None   # rows of the concatenated group outputs, crop-major; None = identity


class VectorisedClientSide:
    """All clients simulated by this process, stacked and run in one vectorised pass; clients start from the template."""

    def __init__(self, template: nn.Module, num_client: int, *, lr: float, momentum: float, weight_decay: float,
                 keep_momentum_copies: bool, device: torch.device, engine: str = "auto",
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        if engine not in ENGINES:
            raise UserError(f"client engine {engine!r} is not one of {', '.join(ENGINES)}")
        if engine == "grouped" and not can_pack(template):
            raise UserError("the grouped client engine needs a client model of convolutions, GroupNorm and "
                            "channel-packable units only; use engine 'vmap'")
        if num_client < 1:
            raise UserError(f"--num_client must be at least 1 (got {num_client})")
        buffers = [name for name, _ in template.named_buffers()]
        if buffers:
            raise UserError(f"--client_exec vmap needs a client model without buffers, this one has {buffers[0]!r} "
                            "(e.g. BatchNorm); use --client_exec loop")
        self.device = torch.device(device)
        self._template = copy.deepcopy(template).to(self.device)
        self._names = [name for name, _ in self._template.named_parameters()]
        # Leaves of shape (num_client, *shape): row c is client c's parameter.
        self._stacked: OrderedDict[str, Tensor] = OrderedDict(
            (name, p.detach().unsqueeze(0).repeat(num_client, *([1] * p.dim())).requires_grad_(True))
            for name, p in self._template.named_parameters())
        self._momentum_stacked: OrderedDict[str, Tensor] = OrderedDict(
            (name, p.detach().clone()) for name, p in self._stacked.items()) if keep_momentum_copies else OrderedDict()
        self.optimizer = StackedSGD(list(self._stacked.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
        # The exact param-group layout of torch.optim.SGD, so per-client optimizer state dicts match the loop's.
        self._sgd_group_template = torch.optim.SGD(
            self._template.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay).state_dict()["param_groups"][0]
        self._num_client = num_client
        self.models = _ClientModules(self._template, self._stacked, num_client, trainable=True)
        self.momentum_models = _ClientModules(self._template, self._momentum_stacked,
                                              num_client if keep_momentum_copies else 0, trainable=False)
        # "grouped": channel-packed clients (rows, clients * channels, H, W); "vmap": client-major (clients, rows, ...).
        self.engine = ("grouped" if can_pack(template) else "vmap") if engine == "auto" else engine
        # channels_last: packed activations and kernels in NHWC (the "vmap" engine keeps torch.vmap's layouts).
        self.memory_format = memory_format
        self._packed = _packed_copy(self._template, memory_format) if self.engine == "grouped" else None
        self._client_pass = torch.vmap(self._call_client, in_dims=(0, 0))
        self._plans: OrderedDict[tuple, list[_ShapePlan]] = OrderedDict()
        self._pool_indices: OrderedDict[tuple[int, ...], Tensor | None] = OrderedDict()
        self._outputs: list[Tensor] = []

    @property
    def num_client(self) -> int:
        return self._num_client

    # ----------------------------------------------------------------------------------------- index plans
    def _call_client(self, parameters: dict[str, Tensor], rows: Tensor) -> Tensor:
        """The client architecture with the given (one client's) parameters on that client's rows."""
        return functional_call(self._template, parameters, (rows,))

    def _index_tensor(self, values: Sequence[int]) -> Tensor:
        """A LongTensor on the clients' device (pinned and non-blocking on CUDA, so no host wait)."""
        tensor = torch.tensor(list(values), dtype=torch.long)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _check_pool(self, client_ids: Sequence[int]) -> tuple[int, ...]:
        """The pool as a tuple of ints; ValueError on a duplicate or an id outside [0, num_client)."""
        pool = tuple(int(c) for c in client_ids)
        if len(set(pool)) != len(pool):
            raise ValueError(f"a client appears twice in the pool {list(pool)}")
        if pool and not 0 <= min(pool) <= max(pool) < self._num_client:
            raise ValueError(f"pool {list(pool)} names a client outside [0, {self._num_client})")
        return pool

    def _pool_index(self, client_ids: Sequence[int]) -> Tensor | None:
        """Client ids of the pool on the device; None when the pool is every client in order (no gather)."""
        pool = self._check_pool(client_ids)
        if pool not in self._pool_indices:
            identity = pool == tuple(range(self._num_client))
            self._pool_indices[pool] = None if identity else self._index_tensor(pool)
            if len(self._pool_indices) > _PLAN_CACHE_SIZE:
                self._pool_indices.popitem(last=False)
        return self._pool_indices[pool]

    def _step_index(self, client_ids: Sequence[int]) -> Tensor:
        """Client ids of the pool on the device (always a tensor: the optimizer indexes with it)."""
        index = self._pool_index(client_ids)
        return index if index is not None else self._index_tensor(range(self._num_client))

    @staticmethod
    def _row_buckets(rows: Sequence[int]) -> dict[int, list[int]]:
        """Pool positions grouped by padded row count (exact counts, or powers of two when there are many)."""
        distinct = sorted(set(rows))
        if len(distinct) <= MAX_ROW_GROUPS:
            padded = {count: count for count in distinct}
        else:
            padded = {count: 1 << (count - 1).bit_length() for count in distinct}
        buckets: dict[int, list[int]] = {}
        for position, count in enumerate(rows):
            buckets.setdefault(padded[count], []).append(position)
        return buckets

    def _plan(self, crops: Sequence[Tensor], pool: tuple[int, ...], rows: tuple[int, ...]) -> list[_ShapePlan]:
        """Gather and scatter indices for these crops, pool and rows (cached; rebuilt when any of them changes)."""
        shapes = tuple((tuple(crop.shape[1:]), crop.dtype) for crop in crops)
        key = (shapes, pool, rows)
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        total = sum(rows)
        for k, crop in enumerate(crops):
            if crop.shape[0] != total:
                raise ValueError(f"crop {k} has {crop.shape[0]} rows but the pool sends {total}")
        offsets = query_index(rows)
        by_shape: dict[tuple, list[int]] = {}
        for k, shape in enumerate(shapes):
            by_shape.setdefault(shape, []).append(k)
        buckets = self._row_buckets(rows)
        plans = []
        for crop_ids in by_shape.values():
            num_crops = len(crop_ids)
            groups: list[_RowGroup] = []
            # Where row i of crop s of pool position j lands in the concatenation of all group outputs.
            landing: dict[tuple[int, int, int], int] = {}
            base = 0
            for padded_rows, positions in buckets.items():
                # Order of a pass's rows: client-major for vmap; for "grouped", row-major with clients innermost,
                # so that (rows, clients, C, H, W) -> (rows, clients * C, H, W) is a view.
                slots = [(g, s, i) for g in range(len(positions)) for s in range(num_crops) for i in range(padded_rows)]
                if self.engine == "grouped":
                    slots.sort(key=lambda slot: (slot[1], slot[2], slot[0]))
                gather = []
                for place, (g, s, i) in enumerate(slots):
                    j = positions[g]
                    # Padding repeats the client's last real row: a valid input whose output is dropped.
                    gather.append(s * total + offsets[j] + min(i, rows[j] - 1))
                    if i < rows[j]:
                        landing[(s, j, i)] = base + place
                base += len(gather)
                client_ids = [pool[j] for j in positions]
                all_clients = client_ids == list(range(self._num_client))
                groups.append(_RowGroup(
                    client_index=None if all_clients else self._index_tensor(client_ids),
                    input_index=None if gather == list(range(num_crops * total)) else self._index_tensor(gather),
                    size=len(positions), padded_rows=padded_rows))
            scatter = [landing[(s, j, i)] for s in range(num_crops) for j in range(len(pool)) for i in range(rows[j])]
            identity = scatter == list(range(base))
            plans.append(_ShapePlan(crops=crop_ids, groups=groups,
                                    output_index=None if identity else self._index_tensor(scatter)))
        self._plans[key] = plans
        if len(self._plans) > _PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plans

    def _pass(self, weights: dict[str, Tensor], rows_in: Tensor, group: _RowGroup, num_crops: int) -> Tensor:
        """One engine pass over a group's gathered rows; returns one output row per gathered row, same order."""
        rows_per_client = num_crops * group.padded_rows
        if self.engine == "grouped":
            packed = rows_in.reshape(rows_per_client, group.size * rows_in.shape[1], *rows_in.shape[2:])
            packed = packed.contiguous(memory_format=self.memory_format)
            output = functional_call(self._packed, weights, (packed,))
            return output.reshape(rows_per_client * group.size, output.shape[1] // group.size, *output.shape[2:])
        output = self._client_pass(weights, rows_in.reshape(group.size, rows_per_client, *rows_in.shape[1:]))
        return output.flatten(0, 1)

    def _run(self, stacked: "OrderedDict[str, Tensor]", crops: Sequence[Tensor], client_ids: Sequence[int],
             rows_per_client: Sequence[int]) -> list[Tensor]:
        """The stacked clients on their own rows of every crop: one smashed tensor per crop, rows in input order."""
        pool = self._check_pool(client_ids)
        rows = tuple(int(r) for r in rows_per_client)
        if len(rows) != len(pool):
            raise ValueError(f"{len(pool)} clients in the pool but {len(rows)} row counts")
        if not pool:
            raise ValueError("the pool is empty")
        if min(rows) < 1:
            raise ValueError(f"every client must send at least one row (got {list(rows)})")
        outputs: list[Tensor | None] = [None] * len(crops)
        for plan in self._plan(crops, pool, rows):
            inputs = crops[plan.crops[0]] if len(plan.crops) == 1 else torch.cat([crops[k] for k in plan.crops])
            group_outputs = []
            for group in plan.groups:
                weights = {name: tensor if group.client_index is None else tensor.index_select(0, group.client_index)
                           for name, tensor in stacked.items()}
                rows_in = inputs if group.input_index is None else inputs.index_select(0, group.input_index)
                group_outputs.append(self._pass(weights, rows_in, group, len(plan.crops)))
            joined = group_outputs[0] if len(group_outputs) == 1 else torch.cat(group_outputs)
            if plan.output_index is not None:
                joined = joined.index_select(0, plan.output_index)
            for k, chunk in zip(plan.crops, joined.chunk(len(plan.crops))):
                # Unpacking and reordering rows give NCHW; the server gets the layout it was asked to use.
                outputs[k] = chunk.contiguous(memory_format=self.memory_format)
        return [output for output in outputs if output is not None]

    # ----------------------------------------------------------------------------------------- training
    def forward(self, crops: Sequence[Tensor], client_ids: Sequence[int],
                rows_per_client: Sequence[int]) -> list[Tensor]:
        """Each client's weights on its own rows of every crop; returns one smashed tensor per crop, rows in input order."""
        self._outputs = self._run(self._stacked, crops, client_ids, rows_per_client)
        return list(self._outputs)

    @torch.no_grad()
    def momentum_forward(self, crops: Sequence[Tensor], client_ids: Sequence[int],
                         rows_per_client: Sequence[int]) -> list[Tensor]:
        """Each client's momentum copy on its own rows (MoCo's key path); no graph."""
        if not self._momentum_stacked:
            raise RuntimeError("this client side keeps no momentum copies (keep_momentum_copies=False)")
        return self._run(self._momentum_stacked, crops, client_ids, rows_per_client)

    def backward(self, gradients: Sequence[Tensor | None]) -> None:
        """Back-propagate the server's gradient rows into the stacked weights; row r goes to the client that sent it."""
        pairs = [(output, gradient) for output, gradient in zip(self._outputs, gradients) if gradient is not None]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        self._outputs = []

    def forget_outputs(self) -> None:
        """Drop the graph of the last forward (no gradient will come back for it)."""
        self._outputs = []

    def zero_grad(self, client_ids: Sequence[int]) -> None:
        """Clear the gradients before the pool's backward.

        The stacked gradient is dropped as a whole: rows outside the pool only ever hold gradients of clients
        that are not stepped, and dropping them keeps the GradScaler's inf check to this step's rows.
        """
        self._check_pool(client_ids)
        for tensor in self._stacked.values():
            tensor.grad = None

    def step(self, client_ids: Sequence[int], scaler: torch.amp.GradScaler) -> None:
        """One optimizer step of each client in the pool (through the shared GradScaler)."""
        self.optimizer.pool_index = self._step_index(client_ids)
        scaler.step(self.optimizer)

    @torch.no_grad()
    def update_momentum_copies(self, client_ids: Sequence[int], momentum: float) -> None:
        """Momentum copy <- momentum * copy + (1 - momentum) * weights, for the pool's clients only."""
        if not 0.0 <= momentum <= 1.0:
            raise UserError(f"the momentum of a key encoder must be in [0, 1] (got {momentum}); use a value such as 0.99")
        index = self._pool_index(client_ids)
        for name, copy_tensor in self._momentum_stacked.items():
            weights = self._stacked[name]
            if index is None:
                copy_tensor.mul_(momentum).add_(weights, alpha=1.0 - momentum)
            else:
                updated = copy_tensor.index_select(0, index).mul_(momentum).add_(weights.index_select(0, index),
                                                                                 alpha=1.0 - momentum)
                copy_tensor.index_copy_(0, index, updated)

    def set_lr(self, lr: float | Sequence[float]) -> None:
        """One rate for every client, or one per client (--compat mocosfl; the optimizer then scales row by row)."""
        if isinstance(lr, (int, float)):
            self.optimizer.row_lr = None
        else:
            rates = list(lr)
            if len(rates) != self._num_client:
                raise ValueError(f"{len(rates)} learning rates for {self._num_client} clients")
            self.optimizer.row_lr = torch.tensor(rates, dtype=torch.float64, device=self.device)
            lr = rates[0]  # the param group's rate: what a per-client optimizer state dict shows
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ----------------------------------------------------------------------------------------- averaging
    @torch.no_grad()
    def stacked_state(self, client_ids: Sequence[int], momentum_copies: bool = False) -> dict[str, Tensor]:
        """Every weight of the given clients (or of their momentum copies) stacked: (len(client_ids), *shape)."""
        stacked = self._momentum_stacked if momentum_copies else self._stacked
        if not stacked:
            raise RuntimeError("this client side keeps no momentum copies (keep_momentum_copies=False)")
        index = self._step_index(self._check_pool(client_ids))
        return {name: tensor.detach().index_select(0, index) for name, tensor in stacked.items()}

    @torch.no_grad()
    def set_every_client(self, state: dict[str, Tensor], momentum_copies: bool = False) -> None:
        """Load one state (e.g. an average) into every client's model, or into every momentum copy."""
        stacked = self._momentum_stacked if momentum_copies else self._stacked
        for name, tensor in stacked.items():
            tensor.copy_(state[name].to(tensor.dtype).unsqueeze(0).expand_as(tensor))

    @torch.no_grad()
    def set_clients(self, client_ids: Sequence[int], stacked: dict[str, Tensor]) -> None:
        """Load row j of every stacked tensor into client client_ids[j] (e.g. personalised averages)."""
        index = self._step_index(self._check_pool(client_ids))
        for name, tensor in self._stacked.items():
            tensor.index_copy_(0, index, stacked[name].to(tensor.device, tensor.dtype))

    def module_with(self, state: dict[str, Tensor]) -> nn.Module:
        """A separate client module holding `state` (e.g. the pool's average, for evaluation); clients unchanged."""
        model = copy.deepcopy(self._template)
        reference = model.state_dict()
        model.load_state_dict({name: value.to(reference[name].dtype) for name, value in state.items()})
        return model

    # ----------------------------------------------------------------------------------------- checkpoints
    def _client_optimizer_state(self, client: int, stepped_rows: dict[str, list[bool]]) -> dict:
        """Client `client`'s optimizer as a torch.optim.SGD state dict (momentum buffers only once it has stepped)."""
        group = self.optimizer.param_groups[0]
        param_group = dict(self._sgd_group_template)
        param_group.update(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                           params=list(range(len(self._names))))
        state: dict[int, dict[str, Tensor]] = {}
        for position, name in enumerate(self._names):
            if stepped_rows.get(name, [False] * self._num_client)[client]:
                buffers = self.optimizer.state[self._stacked[name]]["momentum_buffer"]
                state[position] = {"momentum_buffer": buffers[client].clone()}
        return {"state": state, "param_groups": [param_group]}

    @torch.no_grad()
    def state_dict(self) -> dict:
        """The loop's checkpoint format: per-client model, momentum-copy and torch.optim.SGD state dicts."""
        def per_client(stacked: "OrderedDict[str, Tensor]", count: int) -> list[dict[str, Tensor]]:
            return [OrderedDict((name, tensor[c].detach().clone()) for name, tensor in stacked.items())
                    for c in range(count)]

        # One host transfer per parameter; checkpoints are not on the per-step path.
        stepped_rows = {name: self.optimizer.state[tensor]["stepped"].cpu().tolist()
                        for name, tensor in self._stacked.items() if "stepped" in self.optimizer.state[tensor]}
        return {
            "models": per_client(self._stacked, self._num_client),
            "momentum_models": per_client(self._momentum_stacked, len(self.momentum_models)),
            "optimizers": [self._client_optimizer_state(c, stepped_rows) for c in range(self._num_client)],
        }

    def _load_stacked(self, stacked: "OrderedDict[str, Tensor]", states: Sequence[dict], what: str) -> None:
        """Copy a list of per-client state dicts into the stacked tensors (keys and count must match)."""
        if len(states) != self._num_client:
            raise ValueError(f"the checkpoint holds {len(states)} {what} but this run has {self._num_client}")
        for client, state in enumerate(states):
            if set(state) != set(stacked):
                missing = sorted(set(stacked) - set(state)) or sorted(set(state) - set(stacked))
                raise ValueError(f"{what} state {client} does not match the client model (key {missing[0]!r})")
        for name, tensor in stacked.items():
            tensor.copy_(torch.stack([state[name].to(tensor.device, tensor.dtype) for state in states]))

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint written by this class or by the loop's ClientSide."""
        self._load_stacked(self._stacked, state["models"], "client models")
        if self._momentum_stacked or state["momentum_models"]:
            if not self._momentum_stacked:
                raise ValueError(f"the checkpoint holds {len(state['momentum_models'])} momentum copies but this run "
                                 "keeps none")
            self._load_stacked(self._momentum_stacked, state["momentum_models"], "momentum copies")
        optimizer_states = state["optimizers"]
        if len(optimizer_states) != self._num_client:
            raise ValueError(f"the checkpoint holds {len(optimizer_states)} client optimizers but this run has "
                             f"{self._num_client}")
        saved_group = optimizer_states[0]["param_groups"][0]
        if saved_group.get("dampening", 0) != 0 or saved_group.get("nesterov", False) or saved_group.get("maximize", False):
            raise ValueError("the checkpoint's client optimizers use dampening, Nesterov or maximize, "
                             "which the vectorised client side does not implement")
        group = self.optimizer.param_groups[0]
        group.update(lr=saved_group["lr"], momentum=saved_group["momentum"], weight_decay=saved_group["weight_decay"])
        for position, (name, tensor) in enumerate(self._stacked.items()):
            self.optimizer.state.pop(tensor, None)
            present = [position in client_state["state"]
                       and client_state["state"][position].get("momentum_buffer") is not None
                       for client_state in optimizer_states]
            if not any(present):
                continue
            buffers, stepped = self.optimizer._buffers_of(tensor)
            for client, client_state in enumerate(optimizer_states):
                if present[client]:
                    buffers[client].copy_(client_state["state"][position]["momentum_buffer"])
            stepped.copy_(torch.tensor(present, dtype=torch.bool))
