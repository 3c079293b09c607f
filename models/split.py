"""Split backbones: the architecture registry, the client and server halves at a cut, and their state dicts.

A backbone is a list of *units* in network order (for a ResNet: the stem, then every residual block). A model
split at ``cutlayer`` keeps ``units[:cutlayer]`` on the client and ``units[cutlayer:]``, global average pooling
and the server method's head on the server; ``cutlayer`` runs from 1 (first unit only) to the number of units
(whole backbone on the client). Every architecture is one `Architecture` entry in `ARCHITECTURES`; the rest of
the collection (client engines, training loop, benchmark) only ever asks this module.

Units keep their name wherever they live, so state dicts map between the split and the unsplit model by adding
or removing the ``backbone.`` prefix:

* unsplit: ``backbone.<unit>.*``, ``head.*``, ``prototypes.weight``
* client:  ``<unit>.*``
* server:  ``backbone.<unit>.*``, ``head.*``, ``prototypes.weight`` (same keys as unsplit)

With a bottleneck at the cut (models.bottleneck), ``client_bottleneck`` ends the client's units and
``server_bottleneck`` starts the server's; the unsplit model holds both at the cut, in that order.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from functions.core.errors import UserError
from models.bottleneck import (
    CLIENT_BOTTLENECK,
    SERVER_BOTTLENECK,
    client_bottleneck,
    parse_bottleneck_option,
    server_bottleneck,
)

BACKBONE_PREFIX = "backbone."


@dataclass(frozen=True)
class Head:
    """What a server method puts after the pooled backbone features: a projection and, optionally, prototypes."""

    projection: nn.Module
    prototypes: nn.Linear | None = None


# The pooled feature dimension in, the method's head out (see ServerMethod.head_builder).
HeadBuilder = Callable[[int], Head]


@dataclass(frozen=True)
class Architecture:
    """A registered split backbone.

    build_units(width, use_ws) makes the units in network order, named as in `unit_names`; feature_dim(width) is
    the size of their pooled output; initialise(backbone, plain_units) sets the initial weights once the head
    exists (so the head's random draws come first, whatever the architecture) and removes the shortcuts of the
    units named in plain_units (--disable_c_residual on the client's units). With takes_image_size, build_units
    also gets the image side, as build_units(width, use_ws, image_size) (the ResNet stem follows it). expansion is
    MocoSFL's `model.expansion` (4 for the bottleneck ResNet-50, 1 otherwise), by which MoCo's V2 head widens its
    hidden layer; it is not always feature_dim / (8 * width) (MobileNetV2: 1280 features, expansion 1).
    """

    name: str
    unit_names: tuple[str, ...]
    build_units: Callable[..., "OrderedDict[str, nn.Module]"]
    feature_dim: Callable[[int], int]
    initialise: Callable[[nn.Module, Sequence[str]], None]
    expansion: int = 1
    takes_image_size: bool = False

    def units(self, width: int, use_ws: bool, image_size: int) -> "OrderedDict[str, nn.Module]":
        """The units for images of `image_size` pixels (the side matters only to architectures that take it)."""
        if self.takes_image_size:
            return self.build_units(width, use_ws, image_size)
        return self.build_units(width, use_ws)

    @property
    def num_cut_points(self) -> int:
        """Valid cutlayer values: 1 .. number of units."""
        return len(self.unit_names)


# Keyed by the lower-case name: --arch is matched without regard to case.
ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(entry: Architecture) -> Architecture:
    """Add a split backbone to the registry (by its name, any case); returns the entry."""
    ARCHITECTURES[entry.name.lower()] = entry
    return entry


def architecture(name: str) -> Architecture:
    """The registered architecture called `name` (any case); a UserError naming the choices otherwise."""
    entry = ARCHITECTURES.get(str(name).lower())
    if entry is None:
        choices = ", ".join(entry.name for entry in ARCHITECTURES.values())
        raise UserError(f"--arch {name} is not supported; choose one of {choices}")
    return entry


def unit_names(arch: str) -> list[str]:
    """Names of the backbone units of `arch` in network order."""
    return list(architecture(arch).unit_names)


def num_cut_points(arch: str) -> int:
    """Number of valid cutlayer values of `arch` (its number of units)."""
    return architecture(arch).num_cut_points


def check_cutlayer(arch: str, cutlayer: int) -> None:
    """UserError unless 1 <= cutlayer <= num_cut_points(arch)."""
    entry = architecture(arch)
    count = entry.num_cut_points
    if isinstance(cutlayer, bool) or not isinstance(cutlayer, int) or not 1 <= cutlayer <= count:
        where = "is past" if isinstance(cutlayer, int) and cutlayer > count else "is not a cut point of"
        raise UserError(
            f"--cutlayer {cutlayer} {where} {entry.name}, which has {count} cut points "
            f"(1 = {entry.unit_names[0]} only, ..., {count} = whole backbone on the client); choose 1..{count}"
        )


def _positive(name: str, value: int) -> None:
    """UserError unless value is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"--{name} must be a positive integer, got {value}")


def _features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Backbone units, global average pool, flatten."""
    return torch.flatten(F.adaptive_avg_pool2d(backbone(x), 1), start_dim=1)


def _features_any(backbone: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Features of one tensor, or of several groups (one pass each) concatenated in order."""
    if isinstance(inputs, torch.Tensor):
        return _features(backbone, inputs)
    # Crops of different resolutions cannot share one batch; their pooled features can.
    return torch.cat([_features(backbone, group) for group in inputs], dim=0)


@torch.no_grad()
def smashed_row_shape(client_part: nn.Module, size: int) -> tuple[int, ...]:
    """The shape of one row of a client part's output (smashed data) for square images of `size` pixels: a CPU copy
    of the part, in eval mode, on one blank image (the part itself, its device and its statistics are untouched)."""
    probe = copy.deepcopy(client_part).cpu().eval()
    return tuple(probe(torch.zeros(1, 3, size, size)).shape[1:])


class ServerNet(nn.Module):
    """Server part: the backbone units after the cut, pooling, the method's head (and prototypes, if any)."""

    def __init__(self, backbone: nn.Sequential, head: nn.Module, prototypes: nn.Linear | None, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.prototypes = prototypes
        self.feature_dim = feature_dim

    def features(self, smashed: torch.Tensor) -> torch.Tensor:
        """Remaining units, global average pool and flatten: (B, feature_dim)."""
        return _features(self.backbone, smashed)

    def forward(self, smashed: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """head(features(...)) of one tensor or of several resolution groups."""
        return self.head(_features_any(self.backbone, smashed))


class UnsplitNet(ServerNet):
    """The whole network in one module: backbone units, pooling, head (and prototypes)."""

    def __init__(self, backbone: nn.Sequential, head: nn.Module, prototypes: nn.Linear | None, feature_dim: int,
                 arch: str, client_residual_cut: int | None, bottleneck_cut: int | None = None) -> None:
        super().__init__(backbone, head, prototypes, feature_dim)
        self.arch = architecture(arch).name
        # Cut layer whose client units had their shortcut removed; None when all shortcuts are present.
        self.client_residual_cut = client_residual_cut
        # Cut layer at which the bottleneck pair sits; None without a bottleneck.
        self.bottleneck_cut = bottleneck_cut


@dataclass
class SplitModel:
    """Client units (input images -> smashed activations) and the server part."""

    client: nn.Sequential
    server: ServerNet
    cutlayer: int
    arch: str


def identity_head(feature_dim: int) -> Head:
    """No projection: the server outputs the pooled backbone features (evaluation, benchmarks, tests)."""
    return Head(nn.Identity())


def build_unsplit_model(arch: str = "ResNet18", *, cutlayer: int | None = None, head: HeadBuilder = identity_head,
                        use_ws: bool = True, client_residual: bool = True, width: int = 64,
                        bottleneck: str | None = None, image_size: int = 32) -> UnsplitNet:
    """The unsplit network; with the same torch seed its weights equal build_split_model's for every cutlayer.

    `image_size` is the side of the input images (the ResNet stem follows it, as MocoSFL's). `cutlayer` matters
    only with client_residual=False (the units before the cut lose their shortcut) and with a `bottleneck` (a
    --bottleneck_option code: the pair of bottleneck layers sits at the cut). The bottleneck's weights are drawn
    last, so the other weights do not depend on it.
    """
    entry = architecture(arch)
    _positive("width", width)
    if not client_residual and cutlayer is None:
        raise UserError("client_residual=False needs --cutlayer: it removes the shortcuts of the client blocks")
    if bottleneck is not None and cutlayer is None:
        raise UserError("a bottleneck needs --cutlayer: it sits at the cut")
    if cutlayer is not None:
        check_cutlayer(arch, cutlayer)
    feature_dim = entry.feature_dim(width)
    # Fixed creation order (units, head, then initialisation) keeps the weights independent of the cut.
    backbone = nn.Sequential(entry.units(width, use_ws, image_size))
    if [name for name, _ in backbone.named_children()] != list(entry.unit_names):
        raise ValueError(f"{entry.name}: build_units made units that differ from its unit_names")
    parts = head(feature_dim)
    plain_units = entry.unit_names[:cutlayer] if not client_residual and cutlayer is not None else ()
    entry.initialise(backbone, plain_units)
    if bottleneck is not None:
        assert cutlayer is not None
        backbone = _with_bottleneck(backbone, cutlayer, bottleneck, image_size)
    return UnsplitNet(backbone, parts.projection, parts.prototypes, feature_dim, entry.name,
                      cutlayer if plain_units else None, cutlayer if bottleneck is not None else None)


def _with_bottleneck(backbone: nn.Sequential, cutlayer: int, option: str, image_size: int) -> nn.Sequential:
    """`backbone` with the bottleneck pair of `option` inserted after unit `cutlayer`."""
    spec = parse_bottleneck_option(option)
    units = list(backbone.named_children())
    with torch.no_grad():
        cut_shape = nn.Sequential(OrderedDict(units[:cutlayer]))(torch.zeros(1, 3, image_size, image_size)).shape
    channels, height, width = cut_shape[1:]
    if height % spec.stride or width % spec.stride:
        raise UserError(f"--bottleneck_option {option}: stride {spec.stride} does not divide the {height}x{width} "
                        f"grid of the smashed data at --cutlayer {cutlayer}; choose a smaller S or another cut")
    pair = [(CLIENT_BOTTLENECK, client_bottleneck(channels, spec)), (SERVER_BOTTLENECK, server_bottleneck(channels, spec))]
    return nn.Sequential(OrderedDict(units[:cutlayer] + pair + units[cutlayer:]))


def split_unsplit(model: UnsplitNet, cutlayer: int) -> SplitModel:
    """Split `model` at `cutlayer`; the parts share modules (and so parameters) with `model`."""
    check_cutlayer(model.arch, cutlayer)
    for fixed_cut, what in ((model.client_residual_cut, "its client shortcuts removed"),
                            (model.bottleneck_cut, "its bottleneck")):
        if fixed_cut is not None and fixed_cut != cutlayer:
            raise ValueError(f"model has {what} at cutlayer {fixed_cut}, not {cutlayer}")
    units = list(model.backbone.named_children())
    client_count = cutlayer + (1 if model.bottleneck_cut is not None else 0)
    client = nn.Sequential(OrderedDict(units[:client_count]))
    server_backbone = nn.Sequential(OrderedDict(units[client_count:]))
    server = ServerNet(server_backbone, model.head, model.prototypes, model.feature_dim)
    return SplitModel(client=client, server=server, cutlayer=cutlayer, arch=model.arch)


def build_split_model(arch: str = "ResNet18", cutlayer: int = 1, *, head: HeadBuilder = identity_head,
                      use_ws: bool = True, client_residual: bool = True, width: int = 64,
                      bottleneck: str | None = None, image_size: int = 32) -> SplitModel:
    """The backbone split at `cutlayer`: client = units[:cutlayer], server = units[cutlayer:] + pool + head (with a
    bottleneck: client_bottleneck ends the client, server_bottleneck starts the server)."""
    model = build_unsplit_model(arch, cutlayer=cutlayer, head=head, use_ws=use_ws, client_residual=client_residual,
                                width=width, bottleneck=bottleneck, image_size=image_size)
    return split_unsplit(model, cutlayer)
