"""MocoSFL's bottleneck at the cut (--bottleneck_option, e.g. C4S2): the client squeezes its smashed data to fewer
channels (and a coarser grid) before sending them, the server expands them back before its own units.

Option codes, as in MocoSFL: ``C<channels>`` the smashed data's channels, ``S<stride>`` (1, 2, 4, ...) how much the
grid shrinks, an optional ``K<kernel>`` before C (stride 1 only), and ``noRELU`` to leave out the ReLUs. C4S2 on a
ResNet-18 cut after the stem sends 4 x 16 x 16 values per image instead of 64 x 32 x 32.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

from functions.core.errors import UserError

CLIENT_BOTTLENECK = "client_bottleneck"
SERVER_BOTTLENECK = "server_bottleneck"
_NO_RELU = re.compile(r"no_?relu", re.IGNORECASE)
_CODE = re.compile(r"(?:K(?P<kernel>\d+))?C(?P<channels>\d+)(?:S(?P<stride>\d+))?")


@dataclass(frozen=True)
class BottleneckSpec:
    """A parsed --bottleneck_option."""

    option: str
    channels: int
    stride: int = 1
    kernel: int = 3
    relu: bool = True

    @property
    def halvings(self) -> int:
        """Number of stride-2 convolutions (log2 of the stride); 0 for stride 1."""
        return self.stride.bit_length() - 1


def parse_bottleneck_option(option: str) -> BottleneckSpec:
    """The bottleneck of a MocoSFL option code (C4S2, C8S1, K5C8S1, noRELUC4S2); a UserError for anything else."""
    relu = _NO_RELU.search(option) is None
    code = _NO_RELU.sub("", option)
    match = _CODE.fullmatch(code)
    if match is None:
        raise UserError(f"--bottleneck_option {option} is not a bottleneck code; write C<channels>S<stride> "
                        "(e.g. C4S2), optionally K<kernel> before C and noRELU")
    channels = int(match["channels"])
    stride = int(match["stride"] or 1)
    kernel = int(match["kernel"] or 3)
    if channels < 1:
        raise UserError(f"--bottleneck_option {option}: the channel count must be at least 1")
    if stride < 1 or stride & (stride - 1):
        raise UserError(f"--bottleneck_option {option}: the stride must be 1 or a power of two, got {stride}")
    if kernel < 1 or kernel % 2 == 0:
        raise UserError(f"--bottleneck_option {option}: the kernel must be odd, got {kernel}")
    if match["kernel"] and stride > 1:
        raise UserError(f"--bottleneck_option {option}: K sets the kernel of stride-1 bottlenecks only (strided ones "
                        "use 3x3, as in MocoSFL); drop K or use S1")
    return BottleneckSpec(option, channels, stride, kernel, relu)


def _xavier(module: nn.Module) -> nn.Module:
    """MocoSFL's initialisation of the bottleneck layers: Xavier-uniform weights, zero biases."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return module


def client_bottleneck(in_channels: int, spec: BottleneckSpec) -> nn.Sequential:
    """The client's half: one conv to spec.channels (strided 3x3 convs for S2, S4, ...), ReLU between and after."""
    layers: list[nn.Module] = []
    if spec.stride == 1:
        layers.append(nn.Conv2d(in_channels, spec.channels, spec.kernel, padding=spec.kernel // 2))
    else:
        for index in range(spec.halvings):
            if index and spec.relu:
                layers.append(nn.ReLU())
            layers.append(nn.Conv2d(in_channels if index == 0 else spec.channels, spec.channels, 3, stride=2,
                                    padding=1))
    if spec.relu:
        layers.append(nn.ReLU())
    # Layer order (and so state-dict indices) as in MocoSFL, so its published client parts load by index.
    return _xavier(nn.Sequential(*layers))


def server_bottleneck(out_channels: int, spec: BottleneckSpec) -> nn.Sequential:
    """The server's half: transposed 3x3 convs back to the cut's grid (one conv for S1), ReLU between and after."""
    layers: list[nn.Module] = []
    if spec.stride == 1:
        layers.append(nn.Conv2d(spec.channels, out_channels, spec.kernel, padding=spec.kernel // 2))
    else:
        for index in range(spec.halvings):
            last = index == spec.halvings - 1
            layers.append(nn.ConvTranspose2d(spec.channels, out_channels if last else spec.channels, 3, stride=2,
                                             padding=1, output_padding=1))
            if spec.relu and not last:
                layers.append(nn.ReLU())
    if spec.relu:
        layers.append(nn.ReLU())
    return _xavier(nn.Sequential(*layers))
