"""CIFAR MobileNetV2 as a split backbone: the stem, every inverted-residual block and the last 1x1 convolution
are units.

Registered in models.split as MobileNetV2, with MocoSFL's CIFAR layout (kuangliu/pytorch-cifar): a stride-1 stem,
the second stage at stride 1, so 32-pixel inputs end at 4x4, and 1280 features at --width 64. Units, 19 cut
points in all:

* ``stem``: 3x3 conv (3 -> 32), GroupNorm, ReLU;
* ``layer<stage>_<index>``: the 17 inverted-residual blocks of the 7 stages (1, 2, 3, 4, 3, 3, 1 blocks);
* ``last_conv``: 1x1 conv (320 -> 1280), GroupNorm, ReLU.

MocoSFL cuts between stages only (its cut k keeps the stem and the first k - 1 stages); that is this module's cut
1, 2, 4, 7, 11, 14, 17, 18 and 19 for its k = 1 .. 9; the cuts in between split a stage.

Channel counts are MocoSFL's scaled by --width / 64 (at least one channel each), so --width 64 is the standard
network. As in the ResNets, the norm is GroupNorm with about four channels per group after (by default)
weight-standardised convolutions, depthwise ones included; there is no BatchNorm, so the vectorised client engine
can run the client units, and its grouped engine packs the depthwise convolutions as one grouped convolution
with clients x channels groups. Unlike MocoSFL's layer list, the stem and the last convolution end with a ReLU,
as in MobileNetV2 and the kuangliu model MocoSFL took it from.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import ConvNormReLU, conv, drop_shortcuts, group_norm, initialise_like_mocosfl
from models.split import Architecture, register_architecture

# Channels of the standard network, which --width 64 builds.
BASE_WIDTH = 64
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# (expansion, output channels, blocks, stride of the first block) per stage; MocoSFL's CIFAR table, in which the
# second stage keeps stride 1.
_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def scaled_channels(channels: int, width: int) -> int:
    """`channels` of the standard network at --width `width` (channels * width / 64, at least 1)."""
    return max(1, channels * width // BASE_WIDTH)


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise conv (the block's stride), 1x1 linear projection, each followed by GroupNorm
    (ReLU after the first two), plus the shortcut of stride-1 blocks."""

    # Its forward only calls its convolutions and norms, ReLU and an addition: the grouped engine can pack it.
    channel_packable = True

    residual: bool
    shortcut: nn.Module | None

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int, use_ws: bool) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.conv1 = conv(in_channels, hidden, 1, 1, use_ws)
        self.norm1 = group_norm(hidden)
        self.conv2 = conv(hidden, hidden, 3, stride, use_ws, groups=hidden)
        self.norm2 = group_norm(hidden)
        self.conv3 = conv(hidden, out_channels, 1, 1, use_ws)
        self.norm3 = group_norm(out_channels)
        self.residual = True
        self.shortcut = self._make_shortcut(in_channels, out_channels, stride, use_ws)

    @staticmethod
    def _make_shortcut(in_channels: int, out_channels: int, stride: int, use_ws: bool) -> nn.Module | None:
        """Identity when shapes match; a 1x1 conv and GroupNorm when only the channels change (MocoSFL's
        kuangliu blocks); none for strided blocks, whose output has another resolution."""
        if stride != 1:
            return None
        if in_channels == out_channels:
            return nn.Identity()
        return nn.Sequential(conv(in_channels, out_channels, 1, 1, use_ws), group_norm(out_channels))

    def disable_residual(self) -> None:
        """Drop the shortcut: the block becomes a plain conv stack (MocoSFL --disable_c_residual)."""
        self.residual = False
        self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for input x (no ReLU after the projection: a linear bottleneck)."""
        out = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return out


def _unit_names() -> tuple[str, ...]:
    """stem, layer<stage>_<index> for every block, last_conv."""
    blocks = [f"layer{stage}_{index}" for stage, (_, _, count, _) in enumerate(_STAGES, start=1) for index in range(count)]
    return ("stem", *blocks, "last_conv")


def _build_units(width: int, use_ws: bool) -> "OrderedDict[str, nn.Module]":
    """All units of the MobileNetV2, built in network order, keyed by unit name."""
    in_channels = scaled_channels(STEM_CHANNELS, width)
    units: OrderedDict[str, nn.Module] = OrderedDict(stem=ConvNormReLU(3, in_channels, 3, 1, use_ws))
    for stage, (expansion, channels, count, first_stride) in enumerate(_STAGES, start=1):
        out_channels = scaled_channels(channels, width)
        for index in range(count):
            stride = first_stride if index == 0 else 1
            units[f"layer{stage}_{index}"] = InvertedResidual(in_channels, out_channels, expansion, stride, use_ws)
            in_channels = out_channels
    units["last_conv"] = ConvNormReLU(in_channels, scaled_channels(LAST_CHANNELS, width), 1, 1, use_ws)
    return units


def initialise_mobilenetv2(backbone: nn.Module, plain_units: Sequence[str]) -> None:
    """MocoSFL's initialisation (models.layers.initialise_like_mocosfl), then drop the shortcuts of `plain_units`."""
    initialise_like_mocosfl(backbone)
    drop_shortcuts(backbone, plain_units, InvertedResidual)


register_architecture(Architecture(
    name="MobileNetV2",
    unit_names=_unit_names(),
    build_units=_build_units,
    feature_dim=lambda width: scaled_channels(LAST_CHANNELS, width),
    initialise=initialise_mobilenetv2,
))
