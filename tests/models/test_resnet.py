"""Tests of the split ResNet: split/unsplit equivalence, shapes, heads, WS, options and errors."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
from split_states import merge_split, merge_state_dicts, split_state_dict
from torch.func import functional_call

from functions.core.errors import UserError
from functions.methods.heads import build_moco_head, build_swav_head
from functions.methods.registry import method_class
from models.layers import WSConv2d, group_norm_groups
from models.split import build_split_model, build_unsplit_model, num_cut_points, unit_names


def moco_head(**options):
    """MoCo's head builder with these options (moco_version, K_dim)."""
    return partial(build_moco_head, **options)


def swav_head(**options):
    """SwAV's head builder with these options (hidden_mlp, feat_dim, nmb_prototypes)."""
    return partial(build_swav_head, **options)

WIDTH = 8


def _images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """A reproducible random image batch."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _split_forward(split, x: torch.Tensor) -> torch.Tensor:
    """Client then server."""
    return split.server(split.client(x))


def _check_split_matches_unsplit(arch: str, cutlayer: int, x: torch.Tensor) -> None:
    """Split model == same-seed unsplit model == differently seeded unsplit model after loading the split weights."""
    torch.manual_seed(123)
    split = build_split_model(arch, cutlayer, width=WIDTH, head=moco_head(K_dim=16))
    torch.manual_seed(123)
    same_seed = build_unsplit_model(arch, width=WIDTH, head=moco_head(K_dim=16))
    torch.manual_seed(999)
    other_seed = build_unsplit_model(arch, width=WIDTH, head=moco_head(K_dim=16))
    for model in (split.client, split.server, same_seed, other_seed):
        model.eval()
    with torch.no_grad():
        split_out = _split_forward(split, x)
        assert not torch.allclose(other_seed(x), split_out, atol=1e-4)
        other_seed.load_state_dict(merge_state_dicts(split.client.state_dict(), split.server.state_dict()))
        assert torch.allclose(same_seed(x), split_out, atol=1e-5, rtol=1e-4)
        assert torch.allclose(other_seed(x), split_out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cutlayer", range(1, 10))
def test_resnet18_split_equals_unsplit_at_every_cutlayer(cutlayer: int) -> None:
    _check_split_matches_unsplit("ResNet18", cutlayer, _images())


@pytest.mark.parametrize("cutlayer", [1, 5, 17])
def test_resnet50_split_equals_unsplit(cutlayer: int) -> None:
    _check_split_matches_unsplit("resnet50", cutlayer, _images(size=16))


def test_num_cut_points_and_unit_order() -> None:
    assert num_cut_points("ResNet18") == 9
    assert num_cut_points("resnet34") == 17
    assert num_cut_points("RESNET50") == 17
    assert unit_names("ResNet18")[:4] == ["stem", "layer1_0", "layer1_1", "layer2_0"]
    split = build_split_model("ResNet18", 3, width=WIDTH)
    assert [name for name, _ in split.client.named_children()] == ["stem", "layer1_0", "layer1_1"]
    assert [name for name, _ in split.server.backbone.named_children()] == unit_names("ResNet18")[3:]


def test_split_state_dict_round_trip() -> None:
    torch.manual_seed(5)
    unsplit = build_unsplit_model("ResNet18", width=WIDTH, head=moco_head(K_dim=16))
    torch.manual_seed(6)
    split = build_split_model("ResNet18", 4, width=WIDTH, head=moco_head(K_dim=16))
    client_state, server_state = split_state_dict(unsplit.state_dict(), "ResNet18", 4)
    split.client.load_state_dict(client_state)
    split.server.load_state_dict(server_state)
    x = _images()
    for module in (unsplit, split.client, split.server):
        module.eval()
    with torch.no_grad():
        assert torch.allclose(_split_forward(split, x), unsplit(x), atol=1e-5, rtol=1e-4)
    assert merge_state_dicts(client_state, server_state).keys() == unsplit.state_dict().keys()


def test_merge_split_shares_modules_and_matches() -> None:
    split = build_split_model("ResNet18", 2, width=WIDTH, head=moco_head(K_dim=16))
    merged = merge_split(split)
    x = _images()
    for module in (merged, split.client, split.server):
        module.eval()
    with torch.no_grad():
        assert torch.allclose(merged(x), _split_forward(split, x))
    assert merged.backbone.stem is split.client.stem


@pytest.mark.parametrize("size", [32, 16])
def test_feature_and_head_shapes(size: int) -> None:
    x = _images(batch=3, size=size)
    moco = build_split_model("ResNet18", 2, width=WIDTH, head=moco_head(K_dim=24))
    swav = build_split_model("ResNet18", 2, width=WIDTH, head=swav_head(hidden_mlp=32, feat_dim=20, nmb_prototypes=7))
    none = build_split_model("ResNet18", 2, width=WIDTH)
    assert moco.server.feature_dim == 8 * WIDTH
    assert moco.server.features(moco.client(x)).shape == (3, 8 * WIDTH)
    assert moco.server(moco.client(x)).shape == (3, 24)
    assert moco.server.prototypes is None
    assert none.server(none.client(x)).shape == (3, 8 * WIDTH)
    embedding = swav.server(swav.client(x))
    assert embedding.shape == (3, 20)
    assert torch.allclose(embedding.norm(dim=1), torch.ones(3), atol=1e-5)
    assert isinstance(swav.server.prototypes, nn.Linear)
    assert swav.server.prototypes.bias is None
    assert swav.server.prototypes(embedding).shape == (3, 7)


def test_resnet50_feature_dim() -> None:
    split = build_split_model("ResNet50", 17, width=WIDTH)
    assert split.server.feature_dim == 32 * WIDTH
    assert split.server(split.client(_images(size=16))).shape == (2, 32 * WIDTH)


@pytest.mark.parametrize(("version", "mlp", "layers"), [
    ("V1", False, [(8 * WIDTH, 16)]),
    ("smallV2", True, [(8 * WIDTH, 16), (16, 16)]),
    ("V2", True, [(8 * WIDTH, 16), (16, 16)]),
    ("largeV2", True, [(8 * WIDTH, 4096), (4096, 16)]),
    ("largeV2_aggressive", True, [(8 * WIDTH, 16), (16, 16)]),
])
def test_moco_head_versions(version: str, mlp: bool, layers: list) -> None:
    # MocoSFL: a V2 MLP's hidden width is K_dim * expansion; only largeV2 itself has the 4096-wide BatchNorm head.
    head = build_split_model("ResNet18", 9, width=WIDTH, head=moco_head(moco_version=version, K_dim=16, mlp=mlp)).server.head
    linears = [module for module in head.modules() if isinstance(module, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == layers
    assert any(isinstance(module, nn.BatchNorm1d) for module in head.modules()) == (version == "largeV2")
    assert all(torch.equal(layer.bias, torch.zeros_like(layer.bias)) for layer in linears)  # MocoSFL's init


def test_swav_head_layers() -> None:
    head = build_split_model("ResNet18", 9, width=WIDTH, head=swav_head(hidden_mlp=32, nmb_prototypes=5)).server.head
    kinds = [type(module) for module in head.modules() if isinstance(module, (nn.Linear, nn.BatchNorm1d, nn.ReLU))]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    single = build_split_model("ResNet18", 9, width=WIDTH, head=swav_head(hidden_mlp=0, feat_dim=12, nmb_prototypes=5))
    linears = [m for m in single.server.head.modules() if isinstance(m, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(8 * WIDTH, 12)]


def test_smashed_shapes() -> None:
    x = _images(batch=2, size=32)
    assert build_split_model("ResNet18", 1, width=WIDTH).client(x).shape == (2, WIDTH, 32, 32)
    assert build_split_model("ResNet18", 2, width=WIDTH).client(x).shape == (2, WIDTH, 32, 32)
    assert build_split_model("ResNet18", 4, width=WIDTH).client(x).shape == (2, 2 * WIDTH, 16, 16)
    assert build_split_model("ResNet50", 2, width=WIDTH).client(x).shape == (2, 4 * WIDTH, 32, 32)


def test_the_server_pools_each_resolution_group_separately() -> None:
    split = build_split_model("ResNet18", 2, width=WIDTH, head=swav_head(hidden_mlp=16, nmb_prototypes=4))
    for module in (split.client, split.server):
        module.eval()
    large, small = _images(batch=3, size=32, seed=1), _images(batch=2, size=16, seed=2)
    with torch.no_grad():
        groups = [split.client(large), split.client(small)]
        separate = torch.cat([split.server.features(groups[0]), split.server.features(groups[1])])
        assert separate.shape == (5, 8 * WIDTH)
        assert torch.allclose(split.server(groups), split.server.head(separate))


def test_weight_standardised_kernel_statistics() -> None:
    split = build_split_model("ResNet18", 9, width=WIDTH, use_ws=True)
    ws_convs = [m for m in split.client.modules() if isinstance(m, WSConv2d)]
    assert len(ws_convs) == sum(isinstance(m, nn.Conv2d) for m in split.client.modules()) > 0
    for conv in ws_convs:
        with torch.no_grad():
            conv.weight.mul_(3.0).add_(0.5)  # standardisation must undo any scale and shift
        kernel = conv.standardized_weight().flatten(start_dim=1)
        assert torch.allclose(kernel.mean(dim=1), torch.zeros(kernel.shape[0]), atol=1e-5)
        assert torch.allclose(kernel.std(dim=1, unbiased=False), torch.ones(kernel.shape[0]), atol=1e-3)


def test_use_ws_changes_output_and_plain_convs_without_ws() -> None:
    x = _images()
    torch.manual_seed(0)
    with_ws = build_split_model("ResNet18", 3, width=WIDTH, use_ws=True)
    torch.manual_seed(0)
    without_ws = build_split_model("ResNet18", 3, width=WIDTH, use_ws=False)
    assert not any(isinstance(m, WSConv2d) for m in without_ws.client.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without_ws.client.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in without_ws.client.modules())
    # As in MocoSFL, plain convolutions are Xavier-initialised and standardised ones keep PyTorch's default draw.
    conv = without_ws.client.stem.conv.weight.detach()
    assert float(conv.abs().max()) <= (6 / (conv[0].numel() + conv.shape[0] * 9)) ** 0.5
    without_ws.client.load_state_dict(with_ws.client.state_dict())  # same weights: differences are standardisation
    assert not torch.allclose(with_ws.client(x), without_ws.client(x), atol=1e-4)


def test_client_residual_false_changes_client_only() -> None:
    x = _images()
    torch.manual_seed(0)
    residual = build_split_model("ResNet18", 4, width=WIDTH, client_residual=True)
    torch.manual_seed(0)
    plain = build_split_model("ResNet18", 4, width=WIDTH, client_residual=False)
    assert not torch.allclose(residual.client(x), plain.client(x), atol=1e-4)
    server_a, server_b = residual.server.state_dict(), plain.server.state_dict()
    assert server_a.keys() == server_b.keys()
    assert all(torch.equal(server_a[key], server_b[key]) for key in server_a)
    smashed = residual.client(x)
    for module in (residual.server, plain.server):
        module.eval()
    with torch.no_grad():
        assert torch.allclose(residual.server(smashed), plain.server(smashed))
    # Every client weight that still exists is the one the residual model drew.
    client_a = residual.client.state_dict()
    for key, value in plain.client.state_dict().items():
        assert torch.equal(value, client_a[key]), key
    assert all(not block.residual for name, block in plain.client.named_children() if name != "stem")
    # layer2_0's projection shortcut is gone without the residual.
    assert any(key.startswith("layer2_0.shortcut") for key in client_a)
    assert not any(key.startswith("layer2_0.shortcut") for key in plain.client.state_dict())


def test_unsplit_with_client_residual_false_matches_split() -> None:
    x = _images()
    torch.manual_seed(3)
    split = build_split_model("ResNet18", 3, width=WIDTH, client_residual=False, head=moco_head(K_dim=16))
    torch.manual_seed(3)
    unsplit = build_unsplit_model("ResNet18", cutlayer=3, width=WIDTH, client_residual=False, head=moco_head(K_dim=16))
    with torch.no_grad():
        assert torch.allclose(unsplit(x), _split_forward(split, x), atol=1e-5, rtol=1e-4)
    with pytest.raises(UserError, match="cutlayer"):
        build_unsplit_model("ResNet18", width=WIDTH, client_residual=False)


def test_backbone_has_no_batchnorm_and_group_counts() -> None:
    model = build_unsplit_model("ResNet50", width=WIDTH)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.backbone.modules())
    for norm in (m for m in model.backbone.modules() if isinstance(m, nn.GroupNorm)):
        assert norm.num_channels % norm.num_groups == 0
    assert group_norm_groups(64) == 16
    assert group_norm_groups(512) == 128
    assert group_norm_groups(2) == 1
    assert group_norm_groups(14) == 2  # 14 // 4 = 3 does not divide 14; the next divisor down does


@pytest.mark.parametrize("cutlayer", [0, 10, -1])
def test_invalid_cutlayer_is_user_error(cutlayer: int) -> None:
    with pytest.raises(UserError, match=rf"--cutlayer {cutlayer} .*ResNet18, which has 9 cut points"):
        build_split_model("ResNet18", cutlayer, width=WIDTH)


def test_invalid_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="--arch ResNet101 is not supported"):
        build_split_model("ResNet101", 1, width=WIDTH)
    with pytest.raises(UserError, match="--arch"):
        num_cut_points("vgg12")  # VGG-11/13/16/19 are registered, there is no VGG-12
    with pytest.raises(UserError, match="--moco_version"):
        build_split_model("ResNet18", 1, width=WIDTH, head=moco_head(moco_version="V3"))
    with pytest.raises(UserError, match="--mlp needs a V2 version"):
        build_split_model("ResNet18", 1, width=WIDTH, head=moco_head(moco_version="V1", mlp=True))
    with pytest.raises(UserError, match="byol"):
        method_class("byol")  # heads belong to registered methods; an unknown one is named
    with pytest.raises(UserError, match="--nmb_prototypes"):
        build_split_model("ResNet18", 1, width=WIDTH, head=swav_head(nmb_prototypes=0))
    with pytest.raises(UserError, match="--hidden_mlp"):
        build_split_model("ResNet18", 1, width=WIDTH, head=swav_head(nmb_prototypes=3, hidden_mlp=-1))
    with pytest.raises(UserError, match="--width"):
        build_split_model("ResNet18", 1, width=0)


def test_client_is_functional_friendly() -> None:
    split = build_split_model("ResNet18", 3, width=WIDTH)
    client = split.client
    assert list(client.buffers()) == []
    x = _images()
    params = {name: p.detach().clone() for name, p in client.named_parameters()}
    assert torch.allclose(functional_call(client, params, (x,)), client(x))
    doubled_stem = dict(params)
    doubled_stem["stem.norm.weight"] = params["stem.norm.weight"] * 2.0
    assert not torch.allclose(functional_call(client, doubled_stem, (x,)), client(x))
    # Two clients' stacked weights through vmap equal two separate calls.
    stacked = {name: torch.stack([p, p * 1.5]) for name, p in params.items()}
    batches = torch.stack([x, _images(seed=7)])
    vmapped = torch.func.vmap(lambda w, b: functional_call(client, w, (b,)))(stacked, batches)
    second = {name: p * 1.5 for name, p in params.items()}
    assert torch.allclose(vmapped[0], functional_call(client, params, (x,)), atol=1e-5)
    assert torch.allclose(vmapped[1], functional_call(client, second, (batches[1],)), atol=1e-5)


def test_blocks_start_with_their_residual_branch_at_full_strength() -> None:
    # MocoSFL's initialisation: no block starts as the identity (an earlier version zeroed each block's last norm).
    torch.manual_seed(0)
    for arch, unit in (("ResNet18", "layer1_1"), ("ResNet50", "layer1_1"), ("MobileNetV2", "layer2_1")):
        model = build_unsplit_model(arch, width=WIDTH)
        block = model.backbone.get_submodule(unit)
        assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in block.modules()
                   if isinstance(m, nn.GroupNorm))
        x = torch.relu(torch.randn(2, block.conv1.in_channels, 8, 8))
        with torch.no_grad():
            assert not torch.allclose(block(x), x, atol=1e-2), arch


@pytest.mark.parametrize("arch", ["ResNet18", "VGG11", "MobileNetV2"])
def test_standardised_convolutions_keep_pytorchs_default_draw(arch: str) -> None:
    # PyTorch's default: uniform in +-1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5)), so std = bound / sqrt(3).
    torch.manual_seed(0)
    model = build_unsplit_model(arch, width=16)
    weights = [m.weight.detach() for m in model.backbone.modules() if isinstance(m, WSConv2d)]
    assert weights
    for weight in weights:
        bound = 1 / weight[0].numel() ** 0.5
        assert float(weight.abs().max()) <= bound
        if weight.numel() >= 2000:
            assert float(weight.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.1)
