"""ResNet-18/34/50 as split backbones: the stem (no max-pool) and every residual block are units.

Registered in models.split as ResNet18, ResNet34 and ResNet50; units are named ``stem``, ``layer1_0``,
``layer1_1``, ..., ``layer4_1``, so cut 1 keeps the stem on the client, cut 2 the stem and the first block.

The stem follows the image size as MocoSFL's does (its `conv3x3_gn`): a 7x7 stride-2 convolution for 224-pixel
images, a 3x3 stride-2 one for 64-pixel images (Tiny-ImageNet: cut 1 sends 32x32 maps), a 3x3 stride-1 one for
every other size (CIFAR, SVHN at 32, STL-10 at 96); never a max-pool.

Normalisation is GroupNorm with about four channels per group (the MocoSFL choice: 64 channels -> 16 groups,
512 -> 128) and, by default, weight-standardised convolutions. There is no BatchNorm and no buffer in the
backbone, so client modules work with ``torch.func.functional_call`` and ``vmap`` over stacked per-client
weights, and the grouped client engine can pack them (the units declare ``channel_packable``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import conv, drop_shortcuts, group_norm, initialise_like_mocosfl
from models.split import Architecture, register_architecture

# Blocks per stage and block type for each architecture.
_ARCH_SPECS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "ResNet18": ("basic", (2, 2, 2, 2)),
    "ResNet34": ("basic", (3, 4, 6, 3)),
    "ResNet50": ("bottleneck", (3, 4, 6, 3)),
}


# (kernel side, stride) of the stem's convolution by image side; every other side: 3x3, stride 1 (MocoSFL's rule).
STEM_BY_IMAGE_SIZE: dict[int, tuple[int, int]] = {224: (7, 2), 64: (3, 2)}
DEFAULT_STEM = (3, 1)


def stem_geometry(image_size: int | None) -> tuple[int, int]:
    """(kernel side, stride) of the stem's convolution for images of `image_size` pixels (None, as in options
    saved before --data_size was resolved: the 32-pixel stem)."""
    return DEFAULT_STEM if image_size is None else STEM_BY_IMAGE_SIZE.get(int(image_size), DEFAULT_STEM)


class Stem(nn.Module):
    """Stem: a conv (3x3 stride 1; 3x3 stride 2 at 64 px; 7x7 stride 2 at 224 px), GroupNorm, ReLU (no max-pool)."""

    # Its forward only calls its convolution and norm and applies ReLU: the grouped client engine can pack it.
    channel_packable = True

    def __init__(self, out_channels: int, use_ws: bool, image_size: int = 32) -> None:
        super().__init__()
        kernel_size, stride = stem_geometry(image_size)
        self.conv = conv(3, out_channels, kernel_size, stride, use_ws)
        self.norm = group_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(norm(conv(x)))."""
        return F.relu(self.norm(self.conv(x)))


class _ResidualBlock(nn.Module):
    """Shared shortcut handling of the basic and bottleneck blocks."""

    residual: bool
    shortcut: nn.Module | None

    def _make_shortcut(self, in_channels: int, out_channels: int, stride: int, use_ws: bool) -> nn.Module:
        """Identity when shapes match, else a strided 1x1 conv and GroupNorm."""
        if stride == 1 and in_channels == out_channels:
            return nn.Identity()
        return nn.Sequential(conv(in_channels, out_channels, 1, stride, use_ws), group_norm(out_channels))

    def disable_residual(self) -> None:
        """Drop the shortcut: the block becomes a plain conv stack (MocoSFL --disable_c_residual)."""
        self.residual = False
        self.shortcut = None

    def _add_shortcut(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """relu(out + shortcut(x)), or relu(out) when the residual is disabled."""
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs (the first strided), each followed by GroupNorm, plus the shortcut."""

    expansion = 1
    channel_packable = True

    def __init__(self, in_channels: int, planes: int, stride: int, use_ws: bool) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv(in_channels, planes, 3, stride, use_ws)
        self.norm1 = group_norm(planes)
        self.conv2 = conv(planes, out_channels, 3, 1, use_ws)
        self.norm2 = group_norm(out_channels)
        self.residual = True
        self.shortcut = self._make_shortcut(in_channels, out_channels, stride, use_ws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for input x."""
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self._add_shortcut(out, x)


class Bottleneck(_ResidualBlock):
    """1x1 reduce, strided 3x3, 1x1 expand (x4), each followed by GroupNorm, plus the shortcut."""

    expansion = 4
    channel_packable = True

    def __init__(self, in_channels: int, planes: int, stride: int, use_ws: bool) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv(in_channels, planes, 1, 1, use_ws)
        self.norm1 = group_norm(planes)
        self.conv2 = conv(planes, planes, 3, stride, use_ws)
        self.norm2 = group_norm(planes)
        self.conv3 = conv(planes, out_channels, 1, 1, use_ws)
        self.norm3 = group_norm(out_channels)
        self.residual = True
        self.shortcut = self._make_shortcut(in_channels, out_channels, stride, use_ws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for input x."""
        out = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self._add_shortcut(out, x)


def _unit_names(blocks_per_stage: Sequence[int]) -> tuple[str, ...]:
    """stem, then layer<stage>_<index> for every block."""
    names = ["stem"]
    for stage, num_blocks in enumerate(blocks_per_stage, start=1):
        names.extend(f"layer{stage}_{index}" for index in range(num_blocks))
    return tuple(names)


def _build_units(block_type: str, blocks_per_stage: Sequence[int], width: int, use_ws: bool,
                 image_size: int = 32) -> "OrderedDict[str, nn.Module]":
    """All units of one ResNet for images of `image_size` pixels, built in network order, keyed by unit name."""
    block_class: type[BasicBlock] | type[Bottleneck] = Bottleneck if block_type == "bottleneck" else BasicBlock
    units: OrderedDict[str, nn.Module] = OrderedDict(stem=Stem(width, use_ws, image_size))
    in_channels = width
    for stage, num_blocks in enumerate(blocks_per_stage, start=1):
        planes = width * 2 ** (stage - 1)
        for index in range(num_blocks):
            stride = 2 if stage > 1 and index == 0 else 1
            units[f"layer{stage}_{index}"] = block_class(in_channels, planes, stride, use_ws)
            in_channels = planes * block_class.expansion
    return units


def initialise_resnet(backbone: nn.Module, plain_units: Sequence[str]) -> None:
    """MocoSFL's initialisation (models.layers.initialise_like_mocosfl), then drop the shortcuts of `plain_units`.

    Every block starts with its residual branch at full strength, as in MocoSFL: a deeper client part mixes the
    image more from the first step (an earlier version started each block as the identity, which left a deeper
    cut as easy to invert as cut 1 after short runs).
    """
    initialise_like_mocosfl(backbone)
    drop_shortcuts(backbone, plain_units, _ResidualBlock)


def _register(name: str, block_type: str, blocks_per_stage: tuple[int, int, int, int]) -> None:
    expansion = Bottleneck.expansion if block_type == "bottleneck" else BasicBlock.expansion
    register_architecture(Architecture(
        name=name,
        unit_names=_unit_names(blocks_per_stage),
        build_units=lambda width, use_ws, image_size=32: _build_units(block_type, blocks_per_stage, width, use_ws,
                                                                      image_size),
        takes_image_size=True,
        feature_dim=lambda width: 8 * width * expansion,
        initialise=initialise_resnet,
        expansion=expansion,
    ))


for _name, (_block_type, _blocks) in _ARCH_SPECS.items():
    _register(_name, _block_type, _blocks)
