"""The heads of each --moco_version: MocoSFL's parameter counts, and the options a version sets."""
from __future__ import annotations

import pytest

from configs import parse_args
from functions.methods.heads import LARGE_V2_HIDDEN, MOCO_VERSIONS, build_moco_head
from functions.methods.moco import MocoServer
from models.split import architecture, build_split_model


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k


def _resnet18_unit_parameters() -> list[int]:
    """ResNet-18 for 32x32 images as MocoSFL builds it: stem conv + norm, then 8 BasicBlocks (bias-free convs,
    norms with weight and bias, a 1x1 shortcut where the shape changes)."""
    units = [_conv(3, 64, 3) + 2 * 64]
    inputs = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            block_stride = stride if block == 0 else 1
            count = _conv(inputs, planes, 3) + _conv(planes, planes, 3) + 4 * planes
            if block_stride != 1 or inputs != planes:
                count += _conv(inputs, planes, 1) + 2 * planes
            units.append(count)
            inputs = planes
    return units


def _mocosfl_head_parameters(version: str, k_dim: int, mlp: bool) -> int:
    """MocoSFL's classifier: Linear(512, K_dim) without --mlp; largeV2: Linear(512, 4096), BatchNorm1d(4096),
    Linear(4096, K_dim); other V2 versions: Linear(512, K_dim), Linear(K_dim, K_dim) (all with biases)."""
    if not mlp:
        return 512 * k_dim + k_dim
    if version == "largeV2":
        return 512 * LARGE_V2_HIDDEN + LARGE_V2_HIDDEN + 2 * LARGE_V2_HIDDEN + LARGE_V2_HIDDEN * k_dim + k_dim
    return 512 * k_dim + k_dim + k_dim * k_dim + k_dim


@pytest.mark.parametrize("version", list(MOCO_VERSIONS))
def test_each_moco_version_has_mocosfls_parameter_count_at_every_cut(version):
    preset = MOCO_VERSIONS[version]
    units = _resnet18_unit_parameters()
    head = build_moco_head(512, version, preset.K_dim, preset.mlp)
    assert head.prototypes is None
    assert sum(p.numel() for p in head.projection.parameters()) == _mocosfl_head_parameters(version, preset.K_dim,
                                                                                            preset.mlp)
    args = parse_args("moco", ["--moco_version", version])
    for cut in range(1, architecture("ResNet18").num_cut_points + 1):
        split = build_split_model("ResNet18", cut, head=MocoServer.head_builder(args))
        client = sum(p.numel() for p in split.client.parameters())
        server = sum(p.numel() for p in split.server.parameters())
        assert client == sum(units[:cut]), cut
        assert server == sum(units[cut:]) + _mocosfl_head_parameters(version, preset.K_dim, preset.mlp), cut


def test_a_version_sets_its_options_unless_they_are_given():
    args = parse_args("moco", ["--moco_version", "V1"])
    assert (args.mlp, args.K_dim, args.pairloader_option, args.symmetric, args.cos) == (False, 128, "mocov1", False,
                                                                                        False)
    args = parse_args("moco", ["--moco_version", "largeV2", "--K_dim", "256", "--no-symmetric"])
    assert (args.mlp, args.K_dim, args.symmetric, args.cos) == (True, 256, False, True)
