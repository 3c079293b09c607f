"""VGG and MobileNetV2 as split backbones: the scripts train them with both client engines, the engines agree, a
one-client split step is a centralised step, parameter counts are the hand-computed ones, bad cuts are refused."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from engine_comparison import (
    TRAINER_TOLERANCE,
    assert_same_clients,
    assert_same_server,
    assert_same_step,
    client_sides,
    engine_step,
    random_crops,
    train_side_by_side,
)
from sfl_helpers import moco_trainer, swav_trainer
from split_states import merge_state_dicts
from torch import nn

import run_sflmoco
import run_sflswav
from configs import parse_args
from functions.core.errors import UserError
from functions.losses.moco import info_nce_loss
from functions.methods.registry import method_class
from models.split import (
    architecture,
    build_split_model,
    build_unsplit_model,
    num_cut_points,
    unit_names,
)

# Two cut points per architecture. VGG-11: after the first conv (and its pool) and inside stage 3 after a pooled
# unit. MobileNetV2: the stem and the first block (a projection shortcut), and six units (a strided depthwise
# block and an identity shortcut on the client).
CUTS = {"VGG11": (1, 4), "MobileNetV2": (2, 6)}
CASES = [(arch, cut) for arch, cuts in CUTS.items() for cut in cuts]
WIDTH = "4"  # VGG-11 4..32 channels, MobileNetV2 1..80: a step takes milliseconds
CASE_IDS = [f"{arch}-cut{cut}" for arch, cut in CASES]


pytestmark = pytest.mark.usefixtures("one_thread")


def _options(arch: str, cut: int) -> list[str]:
    return ["--arch", arch, "--cutlayer", str(cut), "--width", WIDTH]


# ---------------------------------------------------------------------------------------------- the scripts
@pytest.mark.parametrize("client_exec", ["loop", "vmap"])
@pytest.mark.parametrize("arch, cut", [("VGG11", 4), ("MobileNetV2", 6)], ids=["VGG11-cut4", "MobileNetV2-cut6"])
@pytest.mark.parametrize("script", [run_sflmoco, run_sflswav], ids=["moco", "swav"])
def test_the_scripts_train_two_steps_with_either_client_engine(tmp_path, script, arch, cut, client_exec):
    method_options = (["--K", "32", "--K_dim", "8"] if script is run_sflmoco else
                      ["--nmb_prototypes", "6", "--feat_dim", "8", "--hidden_mlp", "16", "--nmb_crops", "2", "1"])
    results = script.main(["--dataset", "synthetic", *_options(arch, cut), "--num_client", "2", "--batch_size", "4", "--max_steps", "2",
                           "--client_exec", client_exec, "--skip_linear", "--eval_freq", "0", "--num_workers", "0",
                           "--output_dir", str(tmp_path), *method_options])
    train_loss = json.loads((tmp_path / "metrics.json").read_text())["train_loss"]
    assert len(train_loss) == 2 and all(torch.isfinite(torch.tensor(train_loss)).flatten())
    assert results["step"] == 2 and results["knn_acc"] is not None


# ---------------------------------------------------------------------------------------------- the engines
@pytest.mark.parametrize("engine", ["grouped", "vmap"])
@pytest.mark.parametrize("arch, cut", CASES, ids=CASE_IDS)
def test_vectorised_client_steps_equal_the_loop_in_float64(arch, cut, engine):
    """Losses, gradient rows, every client's gradients, weights and momentum copies, as the ResNet's are checked."""
    torch.manual_seed(0)
    template = build_split_model(arch, cut, width=int(WIDTH)).client.double()
    rows, pool, num_client = [2, 1, 3], [3, 0, 1], 4
    loop, vectorised = client_sides(cut, num_client, engine, template=template)
    assert vectorised.engine == engine  # the depthwise and max-pooling units pack: no fallback to vmap
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(2):
        crops = random_crops(sum(rows), seed=step)  # 16- and 8-pixel crops
        expected = engine_step(loop, crops, pool, rows, scaler, seed=10 + step)
        assert_same_step(engine_step(vectorised, crops, pool, rows, scaler, seed=10 + step), expected, pool)
    assert_same_clients(loop, vectorised, range(num_client))


@pytest.mark.parametrize("arch, cut", CASES, ids=CASE_IDS)
def test_trainer_steps_are_the_same_with_either_client_engine(tmp_path, arch, cut):
    """Two steps of the training loop (MoCo at the first cut, SwAV at the second): same losses, clients, server."""
    build, extra = ((moco_trainer, []) if cut == CUTS[arch][0] else
                    (swav_trainer, ["--nmb_crops", "2", "1", "--freeze_prototypes_niters", "0"]))
    options = [*_options(arch, cut), "--num_client", "3", "--batch_size", "4", "--momentum", "0.9",
               "--weight_decay", "0.0005", *extra]
    loop_trainer = build(tmp_path / "loop", *options, "--client_exec", "loop")
    vmap_trainer = build(tmp_path / "vmap", *options, "--client_exec", "vmap")
    assert vmap_trainer.clients.engine == "grouped"
    assert_same_clients(loop_trainer.clients, vmap_trainer.clients, range(3), TRAINER_TOLERANCE)
    train_side_by_side(loop_trainer, vmap_trainer, steps=2)
    assert_same_clients(loop_trainer.clients, vmap_trainer.clients, range(3), TRAINER_TOLERANCE)
    assert_same_server(loop_trainer, vmap_trainer)


# ---------------------------------------------------------------------------------------------- split = centralised
def _parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("client_exec", ["loop", "vmap"])
@pytest.mark.parametrize("arch, cut", [("VGG11", 4), ("MobileNetV2", 2)], ids=["VGG11-cut4", "MobileNetV2-cut2"])
def test_one_client_step_equals_a_centralised_step(tmp_path, arch, cut, client_exec):
    trainer = moco_trainer(tmp_path, *_options(arch, cut), "--num_client", "1", "--batch_size", "12",
                           "--weight_decay", "0.0005", "--momentum", "0.9", "--no-symmetric", "--client_exec", client_exec)
    batch = next(trainer.data.loaders.train.epoch(0))
    trainer.set_learning_rates(0, 0)
    # The centralised reference: the unsplit network (client units then server units and head), its momentum copy.
    encoder = nn.Sequential(copy.deepcopy(trainer.clients.models[0]), copy.deepcopy(trainer.method.server))
    key_encoder = nn.Sequential(copy.deepcopy(trainer.clients.momentum_models[0]),
                                copy.deepcopy(trainer.method.server_momentum))
    negatives = trainer.method.queues.shared.negatives.clone()
    optimizer = torch.optim.SGD(encoder.parameters(), lr=trainer.args.lr, momentum=0.9, weight_decay=0.0005)
    view_1, view_2 = batch.crops
    with torch.no_grad():
        key_2 = key_encoder(view_2)
    expected_loss, _ = info_nce_loss(encoder(view_1), key_2, negatives, trainer.args.T)
    optimizer.zero_grad()
    expected_loss.backward()
    optimizer.step()

    loss, _ = trainer.train_step(batch)

    assert torch.allclose(loss, expected_loss.detach(), atol=1e-6)
    for part, actual_part in ((encoder[0], trainer.clients.models[0]), (encoder[1], trainer.method.server)):
        actual = _parameters(actual_part)
        for name, expected in _parameters(part).items():
            assert torch.allclose(actual[name], expected, atol=1e-6), name


@pytest.mark.parametrize("arch", ["VGG11", "VGG19", "MobileNetV2"])
def test_split_equals_unsplit_at_every_cut_and_any_input_size(arch):
    """The weights do not depend on the cut, and global pooling lets 16- to 96-pixel inputs through."""
    torch.manual_seed(5)
    unsplit = build_unsplit_model(arch, width=4)
    images = {size: torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
              for size in (16, 32, 64, 96)}
    with torch.no_grad():
        expected = {size: unsplit(x) for size, x in images.items()}
        assert all(out.shape == (2, architecture(arch).feature_dim(4)) for out in expected.values())
        for cut in range(1, num_cut_points(arch) + 1):
            torch.manual_seed(5)
            split = build_split_model(arch, cut, width=4)
            torch.testing.assert_close(split.server(split.client(images[32])), expected[32])
            assert merge_state_dicts(split.client.state_dict(), split.server.state_dict()).keys() == \
                unsplit.state_dict().keys()


# ---------------------------------------------------------------------------------------------- sizes
def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _gn(channels: int) -> int:
    """GroupNorm scale and shift."""
    return 2 * channels


def _inverted_residual(in_channels: int, out_channels: int, expansion: int, shortcut: str) -> int:
    """1x1 expansion, 3x3 depthwise, 1x1 projection (each with GroupNorm) and the shortcut's parameters."""
    hidden = in_channels * expansion
    block = in_channels * hidden + _gn(hidden) + 9 * hidden + _gn(hidden) + hidden * out_channels + _gn(out_channels)
    return block + (in_channels * out_channels + _gn(out_channels) if shortcut == "projection" else 0)


def test_architectures_cut_points_and_feature_dims():
    assert [num_cut_points(arch) for arch in ("VGG11", "vgg13", "VGG16", "VGG19", "mobilenetv2")] == [8, 10, 13, 16, 19]
    assert unit_names("VGG11") == ["layer1_0", "layer2_0", "layer3_0", "layer3_1", "layer4_0", "layer4_1",
                                   "layer5_0", "layer5_1"]
    names = unit_names("MobileNetV2")
    assert names[:4] == ["stem", "layer1_0", "layer2_0", "layer2_1"] and names[-2:] == ["layer7_0", "last_conv"]
    assert [architecture(arch).feature_dim(64) for arch in ("VGG11", "VGG19", "MobileNetV2")] == [512, 512, 1280]


@pytest.mark.parametrize("arch, expansion", [("VGG11", 1), ("MobileNetV2", 1), ("ResNet18", 1), ("ResNet50", 4)])
def test_moco_v2_head_widens_by_mocosfls_expansion(arch, expansion):
    """MocoSFL's model.expansion, not features / 512: MobileNetV2's 1280 features feed a K_dim-wide hidden layer."""
    args = parse_args("moco", ["--arch", arch, "--width", "8", "--K_dim", "16", "--moco_version", "V2", "--mlp"])
    head = method_class("moco").head_builder(args)(architecture(arch).feature_dim(8)).projection
    assert [layer.out_features for layer in head if isinstance(layer, nn.Linear)] == [16 * expansion, 16]


def test_client_parameter_counts_are_the_hand_computed_ones():
    # VGG-11 cut 2: conv 3->64 and conv 64->128 (3x3, with bias), each with GroupNorm.
    vgg_cut2 = (9 * 3 * 64 + 64) + _gn(64) + (9 * 64 * 128 + 128) + _gn(128)
    assert _count(build_split_model("VGG11", 2).client) == vgg_cut2 == 76_032
    # MobileNetV2 cut 2: stem (3x3 conv 3->32, GroupNorm), block 32->16 at expansion 1 (projection shortcut).
    mobilenet_cut2 = 9 * 3 * 32 + _gn(32) + _inverted_residual(32, 16, 1, "projection")
    assert _count(build_split_model("MobileNetV2", 2).client) == mobilenet_cut2 == 3_456
    # Cut 4 adds 16->24 at expansion 6 (projection) and 24->24 (identity shortcut, no parameters).
    mobilenet_cut4 = mobilenet_cut2 + _inverted_residual(16, 24, 6, "projection") + _inverted_residual(24, 24, 6, "identity")
    assert _count(build_split_model("MobileNetV2", 4).client) == mobilenet_cut4 == 17_856
    # --disable_c_residual removes the client's projection shortcut (1x1 conv 32->16 and its GroupNorm).
    plain = build_split_model("MobileNetV2", 2, client_residual=False)
    assert _count(plain.client) == mobilenet_cut2 - (32 * 16 + _gn(16))
    # Whole backbones: MocoSFL's group-norm models without their classifiers.
    assert _count(build_unsplit_model("VGG11")) == 9_225_984
    assert _count(build_unsplit_model("MobileNetV2")) == 2_284_112


def test_disabling_client_shortcuts_changes_the_client_only():
    torch.manual_seed(0)
    with_shortcuts = build_split_model("MobileNetV2", 4, width=8)
    torch.manual_seed(0)
    without = build_split_model("MobileNetV2", 4, width=8, client_residual=False)
    assert all(block.shortcut is None and not block.residual for name, block in without.client.named_children()
               if name != "stem")
    assert with_shortcuts.server.backbone.layer3_1.shortcut is not None  # the server keeps its shortcuts
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(without.client(x), with_shortcuts.client(x))
        smashed = with_shortcuts.client(x)
        torch.testing.assert_close(without.server(smashed), with_shortcuts.server(smashed))


@pytest.mark.parametrize("arch", ["VGG11", "MobileNetV2"])
@pytest.mark.parametrize("method", ["moco", "swav"])
def test_an_out_of_range_cutlayer_is_refused_in_one_line(arch, method):
    count = num_cut_points(arch)
    with pytest.raises(UserError) as past:
        parse_args(method, ["--arch", arch, "--cutlayer", str(count + 1)])
    assert str(past.value) == (f"--cutlayer {count + 1} is past {arch}, which has {count} cut points (1 = "
                               f"{unit_names(arch)[0]} only, ..., {count} = whole backbone on the client); "
                               f"choose 1..{count}")
    with pytest.raises(UserError, match=f"--cutlayer 0 is not a cut point of {arch}") as zero:
        parse_args(method, ["--arch", arch, "--cutlayer", "0"])
    assert "\n" not in str(past.value) + str(zero.value)
