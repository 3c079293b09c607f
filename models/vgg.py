"""CIFAR VGG-11/13/16/19 as split backbones: every 3x3 convolution (with GroupNorm, ReLU and, at the end of a
stage, the 2x2 max-pool) is one unit.

Registered in models.split as VGG11, VGG13, VGG16 and VGG19 (MocoSFL's configurations A, B, D and E; ``--arch
vgg13`` works too, names are matched without regard to case). Units are named ``layer<stage>_<index>``: VGG-11 has
``layer1_0, layer2_0, layer3_0, layer3_1, layer4_0, layer4_1, layer5_0, layer5_1`` (8 cut points), VGG-13 10,
VGG-16 13 and VGG-19 16. A stage's max-pool belongs to its last convolution's unit, so the client never sends
the unpooled, four times larger activations of a stage's end. MocoSFL counts the pool as a cut layer of its own:
its cut k (over convolutions and pools) trains the same network as this module's cut at the number of
convolutions among its first k layers; only the parameter-free pool may move from the server to the client.

As in MocoSFL's group-norm VGG there is no classifier (the server method puts its head after the pooled
features), the convolutions have a bias (GroupNorm over four channels does not cancel a per-channel bias) and the
normalisation is GroupNorm with about four channels per group after (by default) weight-standardised
convolutions, so the parameter count is MocoSFL's (VGG-11: 9,225,984). The features are the global average of the last unit's output: 512 channels at --width 64 (1x1 at 32 pixels,
2x2 at 64, 3x3 at 96).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import ConvNormReLU, initialise_like_mocosfl
from models.split import Architecture, register_architecture

# Convolutions per stage of each configuration; a stage ends with a 2x2 max-pool.
_STAGE_DEPTHS: dict[str, tuple[int, int, int, int, int]] = {
    "VGG11": (1, 1, 2, 2, 2),
    "VGG13": (2, 2, 2, 2, 2),
    "VGG16": (2, 2, 3, 3, 3),
    "VGG19": (2, 2, 4, 4, 4),
}
# Output channels of each stage as multiples of --width (64, 128, 256, 512, 512 at width 64).
_STAGE_MULTIPLIERS = (1, 2, 4, 8, 8)


class VGGUnit(ConvNormReLU):
    """3x3 conv, GroupNorm, ReLU and, at the end of a stage, a 2x2 max-pool."""

    # Max-pooling works channel by channel, so channel-packed clients stay apart: the grouped engine packs it.
    channel_packable = True

    def __init__(self, in_channels: int, out_channels: int, pool: bool, use_ws: bool) -> None:
        super().__init__(in_channels, out_channels, 3, 1, use_ws, bias=True)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(norm(conv(x))), max-pooled when the unit ends a stage."""
        out = super().forward(x)
        # ceil_mode: an odd side keeps its last row and column, and a 1x1 map stays 1x1, so five pools also take
        # 16-pixel crops (SwAV's small crops), which floor mode would shrink to nothing.
        return F.max_pool2d(out, 2, 2, ceil_mode=True) if self.pool else out

    def extra_repr(self) -> str:
        return f"pool={self.pool}"


def _unit_names(stage_depths: Sequence[int]) -> tuple[str, ...]:
    """layer<stage>_<index> for every convolution."""
    return tuple(f"layer{stage}_{index}" for stage, depth in enumerate(stage_depths, start=1) for index in range(depth))


def _build_units(stage_depths: Sequence[int], width: int, use_ws: bool) -> "OrderedDict[str, nn.Module]":
    """All units of one VGG, built in network order, keyed by unit name."""
    units: OrderedDict[str, nn.Module] = OrderedDict()
    in_channels = 3
    for stage, (depth, multiplier) in enumerate(zip(stage_depths, _STAGE_MULTIPLIERS), start=1):
        out_channels = width * multiplier
        for index in range(depth):
            units[f"layer{stage}_{index}"] = VGGUnit(in_channels, out_channels, pool=index == depth - 1, use_ws=use_ws)
            in_channels = out_channels
    return units


def initialise_vgg(backbone: nn.Module, plain_units: Sequence[str]) -> None:
    """MocoSFL's initialisation (models.layers.initialise_like_mocosfl).

    VGG has no shortcuts, so `plain_units` (--disable_c_residual) changes nothing: the client's units are already
    plain, as in MocoSFL, whose VGG ignores the option.
    """
    initialise_like_mocosfl(backbone)


def _register(name: str, stage_depths: tuple[int, int, int, int, int]) -> None:
    register_architecture(Architecture(
        name=name,
        unit_names=_unit_names(stage_depths),
        build_units=lambda width, use_ws: _build_units(stage_depths, width, use_ws),
        feature_dim=lambda width: width * _STAGE_MULTIPLIERS[-1],
        initialise=initialise_vgg,
    ))


for _name, _depths in _STAGE_DEPTHS.items():
    _register(_name, _depths)
