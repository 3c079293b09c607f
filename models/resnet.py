"""CIFAR ResNet-18/34/50 split at a cut layer, with MoCo and SwAV heads.

The backbone is a list of *units*: the stem (3x3 conv, norm, ReLU; no max-pool)
followed by every residual block of layer1..layer4. A model split at
``cutlayer`` keeps ``units[:cutlayer]`` on the client and ``units[cutlayer:]``,
global average pooling and the head on the server; ``cutlayer`` therefore runs
from 1 (stem only) to the number of units (whole backbone on the client).

Normalisation is GroupNorm with about four channels per group (the MocoSFL
choice: 64 channels -> 16 groups, 512 -> 128) and, by default, weight-standardised
convolutions. There is no BatchNorm and no buffer in the backbone, so client
modules work with ``torch.func.functional_call`` and ``vmap`` over stacked
per-client weights.

Units are named by their place in the network (``stem``, ``layer1_0``,
``layer1_1``, ..., ``layer4_1``) and keep that name wherever they live, so state
dicts map between the split and the unsplit model by adding or removing the
``backbone.`` prefix:

* unsplit: ``backbone.<unit>.*``, ``head.*``, ``prototypes.weight``
* client:  ``<unit>.*``
* server:  ``backbone.<unit>.*``, ``head.*``, ``prototypes.weight`` (same keys as unsplit)
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from functions.errors import UserError

# Blocks per stage and block type for each supported architecture.
_ARCH_SPECS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
_ARCH_DISPLAY = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50"}
_MOCO_VERSIONS = {"v1": "V1", "smallv2": "smallV2", "v2": "V2", "largev2": "largeV2"}
_HEADS = ("moco", "swav", "none")
_LARGE_V2_HIDDEN = 2048
CHANNELS_PER_GROUP = 4
WS_EPS = 1e-5
BACKBONE_PREFIX = "backbone."


def group_norm_groups(channels: int) -> int:
    """Number of GroupNorm groups for `channels`: the largest divisor of `channels` not above channels // 4 (at least 1)."""
    # About four channels per group, as in MocoSFL; the divisor search keeps odd widths valid.
    for groups in range(max(channels // CHANNELS_PER_GROUP, 1), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm over `channels` with the group count of group_norm_groups."""
    return nn.GroupNorm(group_norm_groups(channels), channels)


class WSConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (mean 0, std 1) before every use."""

    def standardized_weight(self) -> torch.Tensor:
        """The kernel actually applied: each output channel's weights shifted to mean 0 and scaled to std 1."""
        flat = self.weight.flatten(start_dim=1)
        mean = flat.mean(dim=1, keepdim=True)
        std = flat.std(dim=1, keepdim=True, unbiased=False)
        # eps outside the square root: a tiny relative change even for the small fan-out Kaiming weights.
        return ((flat - mean) / (std + WS_EPS)).view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution with the standardised kernel."""
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int, use_ws: bool) -> nn.Conv2d:
    """A bias-free conv with 'same' padding, weight-standardised when use_ws."""
    conv_class = WSConv2d if use_ws else nn.Conv2d
    return conv_class(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


class Stem(nn.Module):
    """CIFAR stem: 3x3 conv with stride 1, GroupNorm, ReLU (no max-pool)."""

    def __init__(self, out_channels: int, use_ws: bool) -> None:
        super().__init__()
        self.conv = _conv(3, out_channels, 3, 1, use_ws)
        self.norm = _group_norm(out_channels)

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
        return nn.Sequential(_conv(in_channels, out_channels, 1, stride, use_ws), _group_norm(out_channels))

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

    def __init__(self, in_channels: int, planes: int, stride: int, use_ws: bool) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv(in_channels, planes, 3, stride, use_ws)
        self.norm1 = _group_norm(planes)
        self.conv2 = _conv(planes, out_channels, 3, 1, use_ws)
        self.norm2 = _group_norm(out_channels)
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

    def __init__(self, in_channels: int, planes: int, stride: int, use_ws: bool) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv(in_channels, planes, 1, 1, use_ws)
        self.norm1 = _group_norm(planes)
        self.conv2 = _conv(planes, planes, 3, stride, use_ws)
        self.norm2 = _group_norm(planes)
        self.conv3 = _conv(planes, out_channels, 1, 1, use_ws)
        self.norm3 = _group_norm(out_channels)
        self.residual = True
        self.shortcut = self._make_shortcut(in_channels, out_channels, stride, use_ws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for input x."""
        out = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self._add_shortcut(out, x)


def _arch_key(arch: str) -> str:
    """Lower-case key of a supported architecture name; UserError for anything else."""
    key = str(arch).lower()
    if key not in _ARCH_SPECS:
        raise UserError(f"--arch {arch} is not supported; choose one of ResNet18, ResNet34, ResNet50")
    return key


def unit_names(arch: str) -> list[str]:
    """Names of the backbone units of `arch` in network order: stem, layer1_0, layer1_1, ..."""
    _, blocks_per_stage = _ARCH_SPECS[_arch_key(arch)]
    names = ["stem"]
    for stage, num_blocks in enumerate(blocks_per_stage, start=1):
        names.extend(f"layer{stage}_{index}" for index in range(num_blocks))
    return names


def num_cut_points(arch: str) -> int:
    """Number of valid cutlayer values of `arch` (stem + residual blocks: 9 for ResNet18, 17 for ResNet34/50)."""
    return len(unit_names(arch))


def feature_dim_of(arch: str, width: int = 64) -> int:
    """Dimension of the pooled backbone features: 8*width for ResNet18/34, 32*width for ResNet50."""
    block_type, _ = _ARCH_SPECS[_arch_key(arch)]
    expansion = Bottleneck.expansion if block_type == "bottleneck" else BasicBlock.expansion
    return 8 * width * expansion


def check_cutlayer(arch: str, cutlayer: int) -> None:
    """UserError unless 1 <= cutlayer <= num_cut_points(arch)."""
    display = _ARCH_DISPLAY[_arch_key(arch)]
    count = num_cut_points(arch)
    if isinstance(cutlayer, bool) or not isinstance(cutlayer, int) or not 1 <= cutlayer <= count:
        where = "is past" if isinstance(cutlayer, int) and cutlayer > count else "is not a cut point of"
        raise UserError(
            f"--cutlayer {cutlayer} {where} {display}, which has {count} cut points "
            f"(1 = stem only, 2 = stem + first block, ..., {count} = whole backbone on the client); choose 1..{count}"
        )


def _build_units(arch: str, use_ws: bool, width: int) -> "OrderedDict[str, nn.Module]":
    """All backbone units of `arch`, built in network order, keyed by unit name."""
    block_type, blocks_per_stage = _ARCH_SPECS[_arch_key(arch)]
    block_class: type[BasicBlock] | type[Bottleneck] = Bottleneck if block_type == "bottleneck" else BasicBlock
    units: OrderedDict[str, nn.Module] = OrderedDict(stem=Stem(width, use_ws))
    in_channels = width
    for stage, num_blocks in enumerate(blocks_per_stage, start=1):
        planes = width * 2 ** (stage - 1)
        for index in range(num_blocks):
            stride = 2 if stage > 1 and index == 0 else 1
            units[f"layer{stage}_{index}"] = block_class(in_channels, planes, stride, use_ws)
            in_channels = planes * block_class.expansion
    return units


class L2Normalize(nn.Module):
    """Scales each row to unit Euclidean norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / ||x|| along dim 1."""
        return F.normalize(x, dim=1)


def _positive(name: str, value: int) -> None:
    """UserError unless value is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"--{name} must be a positive integer, got {value}")


def _build_head(
    head: str, feature_dim: int, moco_version: str, K_dim: int, hidden_mlp: int, feat_dim: int, nmb_prototypes: int
) -> tuple[nn.Module, nn.Linear | None]:
    """The projection head and, for SwAV, the prototype layer."""
    head_key = str(head).lower()
    if head_key == "moco":
        version_key = str(moco_version).lower()
        if version_key not in _MOCO_VERSIONS:
            raise UserError(f"--moco_version {moco_version} is not supported; choose one of V1, smallV2, V2, largeV2")
        _positive("K_dim", K_dim)
        version = _MOCO_VERSIONS[version_key]
        if version == "V1":
            return nn.Linear(feature_dim, K_dim), None
        hidden = {"smallV2": K_dim, "V2": feature_dim, "largeV2": _LARGE_V2_HIDDEN}[version]
        return nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, K_dim)), None
    if head_key == "swav":
        _positive("feat_dim", feat_dim)
        _positive("nmb_prototypes", nmb_prototypes)
        if isinstance(hidden_mlp, bool) or not isinstance(hidden_mlp, int) or hidden_mlp < 0:
            raise UserError(f"--hidden_mlp must be 0 (single linear layer) or a positive integer, got {hidden_mlp}")
        if hidden_mlp == 0:
            projection: nn.Module = nn.Linear(feature_dim, feat_dim)
        else:
            projection = nn.Sequential(
                nn.Linear(feature_dim, hidden_mlp), nn.BatchNorm1d(hidden_mlp), nn.ReLU(), nn.Linear(hidden_mlp, feat_dim)
            )
        return nn.Sequential(projection, L2Normalize()), nn.Linear(feat_dim, nmb_prototypes, bias=False)
    if head_key == "none":
        return nn.Identity(), None
    raise UserError(f"head {head} is not supported; choose one of {', '.join(_HEADS)}")


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU), GroupNorm weight 1 and bias 0; Linear layers keep PyTorch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Backbone units, global average pool, flatten."""
    return torch.flatten(F.adaptive_avg_pool2d(backbone(x), 1), start_dim=1)


def _features_any(backbone: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Features of one tensor, or of several groups (one pass each) concatenated in order."""
    if isinstance(inputs, torch.Tensor):
        return _features(backbone, inputs)
    # Crops of different resolutions cannot share one batch; their pooled features can.
    return torch.cat([_features(backbone, group) for group in inputs], dim=0)


class ServerNet(nn.Module):
    """Server part: the backbone units after the cut, pooling, head (and SwAV prototypes)."""

    def __init__(self, backbone: nn.Sequential, head: nn.Module, prototypes: nn.Linear | None, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.prototypes = prototypes
        self.feature_dim = feature_dim

    def features(self, smashed: torch.Tensor) -> torch.Tensor:
        """Remaining units, global average pool and flatten: (B, feature_dim)."""
        return _features(self.backbone, smashed)

    def features_multi(self, smashed_groups: Sequence[torch.Tensor]) -> torch.Tensor:
        """features() of each group (one pass each) concatenated in the given order (SwAV multi-crop)."""
        return _features_any(self.backbone, list(smashed_groups))

    def forward(self, smashed: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """head(features(...)); for SwAV the L2-normalised embedding (scores come from self.prototypes)."""
        return self.head(_features_any(self.backbone, smashed))


class UnsplitResNet(ServerNet):
    """The whole network in one module: backbone units, pooling, head (and SwAV prototypes)."""

    def __init__(
        self,
        backbone: nn.Sequential,
        head: nn.Module,
        prototypes: nn.Linear | None,
        feature_dim: int,
        arch: str,
        client_residual_cut: int | None,
    ) -> None:
        super().__init__(backbone, head, prototypes, feature_dim)
        self.arch = _ARCH_DISPLAY[_arch_key(arch)]
        # Cut layer whose client blocks had their shortcut removed; None when all shortcuts are present.
        self.client_residual_cut = client_residual_cut


@dataclass
class SplitResNet:
    """Client units (input images -> smashed activations) and the server part."""

    client: nn.Sequential
    server: ServerNet
    cutlayer: int
    arch: str


def build_unsplit_resnet(
    arch: str = "ResNet18",
    *,
    cutlayer: int | None = None,
    head: str = "moco",
    moco_version: str = "V2",
    K_dim: int = 128,
    hidden_mlp: int = 2048,
    feat_dim: int = 128,
    nmb_prototypes: int = 0,
    use_ws: bool = True,
    client_residual: bool = True,
    width: int = 64,
) -> UnsplitResNet:
    """The unsplit network; with the same torch seed its weights equal build_split_resnet's for every cutlayer.

    `cutlayer` matters only with client_residual=False: it says which blocks
    (those before the cut) lose their shortcut.
    """
    arch_key = _arch_key(arch)
    _positive("width", width)
    if not client_residual and cutlayer is None:
        raise UserError("client_residual=False needs --cutlayer: it removes the shortcuts of the client blocks")
    if cutlayer is not None:
        check_cutlayer(arch, cutlayer)
    feature_dim = feature_dim_of(arch_key, width)
    # Fixed creation order (units, head, prototypes, then the init pass) keeps weights independent of the cut.
    backbone = nn.Sequential(_build_units(arch_key, use_ws, width))
    head_module, prototypes = _build_head(head, feature_dim, moco_version, K_dim, hidden_mlp, feat_dim, nmb_prototypes)
    model = UnsplitResNet(backbone, head_module, prototypes, feature_dim, arch_key, None)
    _init_weights(model)
    if not client_residual:
        assert cutlayer is not None
        # Shortcuts are removed only after initialisation, so every other weight draws the same random numbers.
        for name in unit_names(arch_key)[1:cutlayer]:
            block = backbone.get_submodule(name)
            assert isinstance(block, _ResidualBlock)
            block.disable_residual()
        model.client_residual_cut = cutlayer
    _zero_init_residual_branches(backbone)
    return model


def _zero_init_residual_branches(backbone: nn.Module) -> None:
    """Zero the last norm's scale in every block that keeps its shortcut, so each block starts as the identity.

    With GroupNorm and weight standardisation, a randomly initialised ResNet-18 otherwise scrambles its input
    (kNN on its features is near chance on CIFAR-10), which gives SwAV's swapped prediction no signal to start
    from. Blocks without a shortcut (client_residual=False) keep scale 1, or they would output zeros.
    """
    for block in backbone.modules():
        if isinstance(block, _ResidualBlock) and block.shortcut is not None:
            last_norm = block.norm3 if isinstance(block, Bottleneck) else block.norm2
            nn.init.zeros_(last_norm.weight)


def split_unsplit(model: UnsplitResNet, cutlayer: int) -> SplitResNet:
    """Split `model` at `cutlayer`; the parts share modules (and so parameters) with `model`."""
    check_cutlayer(model.arch, cutlayer)
    if model.client_residual_cut is not None and model.client_residual_cut != cutlayer:
        raise ValueError(
            f"model has its client shortcuts removed for cutlayer {model.client_residual_cut}, not {cutlayer}"
        )
    units = list(model.backbone.named_children())
    client = nn.Sequential(OrderedDict(units[:cutlayer]))
    server_backbone = nn.Sequential(OrderedDict(units[cutlayer:]))
    server = ServerNet(server_backbone, model.head, model.prototypes, model.feature_dim)
    return SplitResNet(client=client, server=server, cutlayer=cutlayer, arch=model.arch)


def build_split_resnet(
    arch: str = "ResNet18",
    cutlayer: int = 1,
    *,
    head: str = "moco",
    moco_version: str = "V2",
    K_dim: int = 128,
    hidden_mlp: int = 2048,
    feat_dim: int = 128,
    nmb_prototypes: int = 0,
    use_ws: bool = True,
    client_residual: bool = True,
    width: int = 64,
) -> SplitResNet:
    """ResNet split at `cutlayer`: client = units[:cutlayer], server = units[cutlayer:] + pool + head."""
    model = build_unsplit_resnet(
        arch,
        cutlayer=cutlayer,
        head=head,
        moco_version=moco_version,
        K_dim=K_dim,
        hidden_mlp=hidden_mlp,
        feat_dim=feat_dim,
        nmb_prototypes=nmb_prototypes,
        use_ws=use_ws,
        client_residual=client_residual,
        width=width,
    )
    return split_unsplit(model, cutlayer)


def merge_split(split: SplitResNet) -> UnsplitResNet:
    """The unsplit network made of the split model's modules (shared, not copied): client units then server."""
    units = list(split.client.named_children()) + list(split.server.backbone.named_children())
    if [name for name, _ in units] != unit_names(split.arch):
        raise ValueError(f"client and server units do not form a {split.arch} backbone")
    has_dropped_shortcut = any(
        isinstance(module, _ResidualBlock) and not module.residual for _, module in split.client.named_children()
    )
    return UnsplitResNet(
        nn.Sequential(OrderedDict(units)),
        split.server.head,
        split.server.prototypes,
        split.server.feature_dim,
        split.arch,
        split.cutlayer if has_dropped_shortcut else None,
    )


def split_state_dict(
    unsplit_state: Mapping[str, torch.Tensor], arch: str, cutlayer: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(client_state, server_state) for a split at `cutlayer` from an unsplit model's state dict."""
    check_cutlayer(arch, cutlayer)
    client_units = set(unit_names(arch)[:cutlayer])
    client_state: dict[str, torch.Tensor] = {}
    server_state: dict[str, torch.Tensor] = {}
    for key, value in unsplit_state.items():
        if key.startswith(BACKBONE_PREFIX) and key[len(BACKBONE_PREFIX) :].split(".", 1)[0] in client_units:
            client_state[key[len(BACKBONE_PREFIX) :]] = value
        else:
            server_state[key] = value
    return client_state, server_state


def merge_state_dicts(
    client_state: Mapping[str, torch.Tensor], server_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """An unsplit model's state dict from a client state dict and a server state dict."""
    merged = {BACKBONE_PREFIX + key: value for key, value in client_state.items()}
    overlap = merged.keys() & server_state.keys()
    if overlap:
        raise ValueError(f"client and server both hold {sorted(overlap)[0]}")
    merged.update(server_state)
    return merged
