"""Model-inversion decoders, layer for layer as MocoSFL's attacker builds them (its --MIA_arch names).

* ``custom``: MocoSFL's default: per doubling of the side a 3x3 convolution halving the channels and a stride-2
  transposed convolution (ReLU after each), the last one to RGB, then a sigmoid.
* ``conv_normN<N>C<C>``: a 3x3 convolution into C channels, N more, then two stages that each double the side
  (a stride-2 transposed convolution) or, where the side needs no more doubling, keep it (a 3x3 convolution),
  further doublings, a 3x3 convolution to RGB and its norm, a sigmoid; every layer is followed by a norm and ReLU.
* ``res_normN<N>C<C>``: the same with MocoSFL's pre-activation residual blocks in place of the convolutions
  (ReLU after each block) and a last block to RGB.

``group_norm`` selects MocoSFL's variant for small batches: GroupNorm (about four channels per group) and
weight-standardised convolutions where MocoSFL standardises them; otherwise BatchNorm and plain convolutions.
Module indices and names follow MocoSFL's (``m.<index>`` there, ``<index>`` here; its ``bn0``/``bn1`` are ``norm0``/
``norm1``), so a MocoSFL decoder's state dict loads by renaming alone.
"""
from __future__ import annotations

import math
import re

import torch.nn.functional as F
from torch import Tensor, nn

from functions.core.errors import UserError

DECODER_NAMES = "custom, conv_normN<N>C<C> or res_normN<N>C<C>"
_DECODER_NAME = re.compile(r"^(conv|res)_normN(\d+)C(\d+)$")
CHANNELS_PER_GROUP = 4
WS_EPS = 1e-5


def _standardised(weight: Tensor) -> Tensor:
    """MocoSFL's weight standardisation of a decoder kernel: each slice along dim 0 shifted to mean 0 and divided
    by its sample standard deviation (unbiased) plus 1e-5."""
    centred = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
    return centred / (centred.flatten(1).std(dim=1).view(-1, 1, 1, 1) + WS_EPS)


class StandardisedConv2d(nn.Conv2d):
    """Conv2d with MocoSFL's decoder weight standardisation (per output channel)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, _standardised(self.weight), self.bias)


class StandardisedConvTranspose2d(nn.ConvTranspose2d):
    """ConvTranspose2d with MocoSFL's weight standardisation, which for this kernel layout is per input channel."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        return F.conv_transpose2d(x, _standardised(self.weight), self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)


def _norm(channels: int, group_norm: bool) -> nn.Module:
    """GroupNorm with max(channels // 4, 1) groups, or BatchNorm."""
    if group_norm:
        return nn.GroupNorm(max(channels // CHANNELS_PER_GROUP, 1), channels)
    return nn.BatchNorm2d(channels)


def _conv3x3(in_channels: int, out_channels: int, standardised: bool) -> nn.Conv2d:
    conv_class = StandardisedConv2d if standardised else nn.Conv2d
    return conv_class(in_channels, out_channels, 3, stride=1, padding=1)


def _doubling(channels: int, standardised: bool) -> nn.ConvTranspose2d:
    conv_class = StandardisedConvTranspose2d if standardised else nn.ConvTranspose2d
    return conv_class(channels, channels, 3, stride=2, padding=1, output_padding=1)


class PreActResBlock(nn.Module):
    """MocoSFL's decoder block: relu(norm0(x)) -> conv1 -> norm1 -> relu -> conv2, plus x (a 1x1 convolution and
    BatchNorm, in both variants, where the channels change)."""

    def __init__(self, in_channels: int, out_channels: int, group_norm: bool) -> None:
        super().__init__()
        self.norm0 = _norm(in_channels, group_norm)
        self.conv1 = _conv3x3(in_channels, out_channels, standardised=group_norm)
        self.norm1 = _norm(out_channels, group_norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(F.relu(self.norm0(x)))))
        return self.conv2(out) + self.shortcut(x)


def _custom_layers(in_channels: int, doublings: int) -> list[nn.Module]:
    """MocoSFL's custom_AE."""
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(doublings - 1):
        layers += [nn.Conv2d(channels, channels // 2, 3, padding=1), nn.ReLU(),
                   nn.ConvTranspose2d(channels // 2, channels // 2, 3, stride=2, padding=1, output_padding=1),
                   nn.ReLU()]
        channels //= 2
    if doublings >= 1:
        return layers + [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(channels, 3, 3, stride=2, padding=1, output_padding=1)]
    return [nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(), nn.Conv2d(in_channels, 3, 3, padding=1)]


def _normed_layers(kind: str, depth: int, channels: int, in_channels: int, doublings: int,
                   group_norm: bool) -> list[nn.Module]:
    """MocoSFL's conv_normN_AE (kind "conv") or res_normN_AE (kind "res"), without the sigmoid."""
    def unit(unit_in: int, unit_out: int) -> list[nn.Module]:
        if kind == "res":
            return [PreActResBlock(unit_in, unit_out, group_norm)]
        return [_conv3x3(unit_in, unit_out, group_norm), _norm(unit_out, group_norm)]

    layers = unit(in_channels, channels) + [nn.ReLU()]
    for _ in range(depth):
        layers += unit(channels, channels) + [nn.ReLU()]
    for stage in (1, 2):  # two stages that double the side, or keep it where no more doubling is needed
        if doublings >= stage:
            layers += [_doubling(channels, group_norm), _norm(channels, group_norm)]
        else:
            layers += unit(channels, channels)
        layers.append(nn.ReLU())
    for _ in range(doublings - 2):
        layers += [_doubling(channels, group_norm), _norm(channels, group_norm), nn.ReLU()]
    if kind == "res":
        return layers + [PreActResBlock(channels, 3, group_norm)]
    return layers + [_conv3x3(channels, 3, group_norm), _norm(3, group_norm)]


def decoder_doublings(in_size: int, out_size: int) -> int:
    """How many times the decoder doubles the side of in_size-pixel smashed data to reach out_size pixels."""
    doublings = int(round(math.log2(out_size / in_size))) if out_size >= in_size else -1
    if doublings < 0 or 2 ** doublings * in_size != out_size:
        raise UserError(f"smashed data of {in_size} pixels cannot be decoded to {out_size}-pixel images by "
                        "doubling; the attack needs an image side a power of two times the smashed data's")
    return doublings


def check_decoder_name(name: str) -> None:
    """A UserError unless `name` is a decoder name (custom, conv_normN<N>C<C>, res_normN<N>C<C> with C >= 1)."""
    match = _DECODER_NAME.match(name)
    if name != "custom" and (match is None or int(match.group(3)) < 1):
        raise UserError(f"--MIA_arch {name!r} is not a decoder name: use {DECODER_NAMES}, e.g. res_normN4C64")


def inversion_decoder(name: str, in_channels: int, in_size: int, out_size: int, *,
                      group_norm: bool = False) -> nn.Sequential:
    """MocoSFL's decoder `name` from smashed data of in_channels x in_size x in_size to RGB images of out_size x
    out_size in [0, 1], with PyTorch's default initialisation (that of MocoSFL's attacker); group_norm: its
    small-batch variant (GroupNorm, weight standardisation)."""
    doublings = decoder_doublings(in_size, out_size)
    if name == "custom":
        return nn.Sequential(*_custom_layers(in_channels, doublings), nn.Sigmoid())
    check_decoder_name(name)
    match = _DECODER_NAME.match(name)
    assert match is not None
    kind, depth, channels = match.group(1), int(match.group(2)), int(match.group(3))
    if group_norm and channels % max(channels // CHANNELS_PER_GROUP, 1):
        raise UserError(f"--MIA_arch {name}: GroupNorm needs C divisible by C // 4 (e.g. C4, C8, C32, C64)")
    return nn.Sequential(*_normed_layers(kind, depth, channels, in_channels, doublings, group_norm), nn.Sigmoid())


def xavier_initialise(decoder: nn.Module) -> nn.Module:
    """MocoSFL's simulated attacker's initialisation: plain convolutions and transposed convolutions (matched by exact
    type, so not the weight-standardised ones) Xavier-uniform with zero biases."""
    for module in decoder.modules():
        if type(module) in (nn.Conv2d, nn.ConvTranspose2d):
            nn.init.xavier_uniform_(module.weight, gain=1.0)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return decoder

