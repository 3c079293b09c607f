"""Layers shared by the split backbones: weight-standardised convolutions, GroupNorm sizing, L2 normalisation."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

CHANNELS_PER_GROUP = 4
WS_EPS = 1e-5


def group_norm_groups(channels: int) -> int:
    """Number of GroupNorm groups for `channels`: the largest divisor of `channels` not above channels // 4 (at least 1)."""
    # About four channels per group, as in MocoSFL; the divisor search keeps odd widths valid.
    for groups in range(max(channels // CHANNELS_PER_GROUP, 1), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm over `channels` with the group count of group_norm_groups."""
    return nn.GroupNorm(group_norm_groups(channels), channels)


class WSConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (mean 0, std 1) before every use."""

    def standardized_weight(self) -> torch.Tensor:
        """The kernel actually applied: each output channel's weights shifted to mean 0 and scaled to std 1."""
        return standardize_kernel(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution with the standardised kernel."""
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def standardize_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Each output channel (row of dim 0) of a convolution kernel shifted to mean 0 and scaled to std 1."""
    flat = weight.flatten(start_dim=1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True, unbiased=False)
    # eps outside the square root: a tiny relative change even for the small fan-out Kaiming weights.
    return ((flat - mean) / (std + WS_EPS)).view_as(weight)


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int, use_ws: bool, groups: int = 1,
         bias: bool = False) -> nn.Conv2d:
    """A conv with 'same' padding (bias-free unless asked), weight-standardised when use_ws; groups=in_channels is
    depthwise."""
    conv_class = WSConv2d if use_ws else nn.Conv2d
    return conv_class(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias,
                      groups=groups)


class L2Normalize(nn.Module):
    """Scales each row to unit Euclidean norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / ||x|| along dim 1."""
        return F.normalize(x, dim=1)


class ConvNormReLU(nn.Module):
    """conv (k x k, stride), GroupNorm, ReLU: a plain backbone unit (VGG's convs, MobileNetV2's stem and last conv)."""

    # Its forward only calls its convolution and norm and applies ReLU: the grouped client engine can pack it.
    channel_packable = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, use_ws: bool,
                 bias: bool = False) -> None:
        super().__init__()
        self.conv = conv(in_channels, out_channels, kernel_size, stride, use_ws, bias=bias)
        self.norm = group_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(norm(conv(x)))."""
        return F.relu(self.norm(self.conv(x)))


def initialise_like_mocosfl(backbone: nn.Module) -> None:
    """MocoSFL's initialisation: weight-standardised convolutions keep PyTorch's default draw (made when they were
    built), plain convolutions, transposed convolutions and linear layers get Xavier-uniform weights and zero
    biases, GroupNorm scale 1 and shift 0.

    MocoSFL's init_weights matches layers by exact type (``type(m) == nn.Conv2d``), so its WSConv2d, a subclass,
    is left as PyTorch built it; leaving those weights untouched here also keeps their draws in construction order,
    so a seeded model draws the same convolution weights as MocoSFL's with the same seed.
    """
    for module in backbone.modules():
        if type(module) in (nn.Conv2d, nn.ConvTranspose2d, nn.Linear):
            nn.init.xavier_uniform_(module.weight, gain=1.0)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def drop_shortcuts(backbone: nn.Module, plain_units: Sequence[str], block_type: type[nn.Module]) -> None:
    """Drop the shortcuts of the `plain_units` blocks of `block_type` (--disable_c_residual); such blocks provide
    `disable_residual()`."""
    for name in plain_units:
        unit = backbone.get_submodule(name)
        if isinstance(unit, block_type):
            unit.disable_residual()
