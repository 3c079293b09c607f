"""The collection grows without touching its files: a server method, a dataset and a split backbone registered from
this test train through the normal loop with both client engines, resume exactly and evaluate."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from configs import build_parser, parse_args
from functions.core.checkpoint import CHECKPOINT_NAME, load_checkpoint
from functions.core.distributed import Runtime
from functions.core.errors import UserError
from functions.data.datasets import DATASETS, DatasetEntry, register_dataset
from functions.data.views import ViewSpec
from functions.methods.base import ServerMethod, StepContext
from functions.methods.registry import METHODS, register_method
from functions.train.runner import run
from functions.train.trainer import Trainer
from models.split import ARCHITECTURES, Architecture, Head, HeadBuilder, register_architecture

SMALL = ["--num_client", "2", "--batch_size", "4", "--width", "4", "--num_epoch", "2", "--skip_linear",
         "--eval_freq", "0", "--num_workers", "0", "--log_freq", "1", "--seed", "7"]


# --------------------------------------------------------------------------------------------------- a method
def negative_cosine_similarity(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean negative cosine similarity of predictions to their stop-gradient targets (SimSiam's D)."""
    return -F.cosine_similarity(prediction, target.detach(), dim=1).mean()


class SimSiamServer(ServerMethod):
    """SimSiam on the server: a projection head, a predictor, the symmetric stop-gradient cosine loss."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("SimSiam")
        group.add_argument("--proj_dim", type=int, default=16, help="projection dimension")
        group.add_argument("--pred_dim", type=int, default=8, help="hidden width of the predictor")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.proj_dim < 1 or args.pred_dim < 1:
            raise UserError("--proj_dim and --pred_dim must be positive")

    @classmethod
    def head_builder(cls, args: argparse.Namespace) -> HeadBuilder:
        return lambda feature_dim: Head(nn.Sequential(nn.Linear(feature_dim, args.proj_dim), nn.ReLU(),
                                                      nn.Linear(args.proj_dim, args.proj_dim)))

    @classmethod
    def view_spec(cls, args: argparse.Namespace, dataset: DatasetEntry) -> ViewSpec:
        return ViewSpec((2,), (dataset.crop_sizes[0],), (0.2,), (1.0,), blur_kernel_size=dataset.blur_kernel_size)

    def __init__(self, args: argparse.Namespace, server: nn.Module, device: torch.device) -> None:
        super().__init__(args, server, device)
        self.trainable_crops = (0, 1)
        self.predictor = nn.Sequential(nn.Linear(args.proj_dim, args.pred_dim), nn.ReLU(),
                                       nn.Linear(args.pred_dim, args.proj_dim)).to(device)

    def optimized_parameters(self) -> list[nn.Parameter]:
        return [*super().optimized_parameters(), *self.predictor.parameters()]

    def compute_loss(self, smashed: Sequence[Tensor], momentum_smashed: Sequence[Tensor],
                     context: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        first, second = self.forward_server(torch.cat(list(smashed))).chunk(2)
        loss = 0.5 * (negative_cosine_similarity(self.predictor(first), second)
                      + negative_cosine_similarity(self.predictor(second), first))
        return loss, {}


@pytest.fixture
def simsiam():
    """SimSiam registered for the test, removed afterwards."""
    register_method("simsiam_test", entry_script="run_sflsimsiam.py", description="SimSiam (registered by a test)")(
        SimSiamServer)
    yield "simsiam_test"
    METHODS.pop("simsiam_test")


def losses(output_dir: Path) -> list[list[float]]:
    """train_loss of a run folder's metrics.json."""
    return json.loads((output_dir / "metrics.json").read_text())["train_loss"]


def check_trains_resumes_and_evaluates(tmp_path: Path, method: str, options: Sequence[str],
                                      eval_options: Sequence[str] = ()) -> dict:
    """2 steps, resume to 3 == 3 steps straight; --eval_only of the checkpoint == the run's final kNN."""
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    run(parse_args(method, [*options, "--max_steps", "2", "--output_dir", str(interrupted)]))
    resumed = run(parse_args(method, [*options, "--max_steps", "3", "--output_dir", str(interrupted), "--resume"]))
    expected = run(parse_args(method, [*options, "--max_steps", "3", "--output_dir", str(straight)]))
    assert losses(interrupted) == losses(straight) and len(losses(straight)) == 3
    assert resumed["knn_acc"] == expected["knn_acc"] and resumed["step"] == 3
    evaluated = run(parse_args(method, ["--eval_only", "--checkpoint", str(interrupted / CHECKPOINT_NAME),
                                        "--skip_linear", "--num_workers", "0", *eval_options]))
    assert evaluated["knn_acc"] == pytest.approx(resumed["knn_acc"]) and evaluated["step"] == 3
    return load_checkpoint(interrupted / CHECKPOINT_NAME)


@pytest.mark.parametrize("client_exec", ["loop", "vmap"])
def test_a_method_registered_here_trains_resumes_and_evaluates(tmp_path, simsiam, client_exec):
    assert "--pred_dim" in build_parser(simsiam).format_help()
    state = check_trains_resumes_and_evaluates(tmp_path, simsiam, ["--dataset", "synthetic", *SMALL,
                                                                   "--client_exec", client_exec])
    assert state["args"]["method"] == simsiam
    assert "predictor.0.weight" in state["method"]  # the method's own module is trained and saved
    with pytest.raises(UserError, match="--pred_dim"):
        parse_args(simsiam, ["--pred_dim", "0"])


# --------------------------------------------------------------------------------------------------- a dataset
TINY_SIZE, TINY_CLASSES = 24, 4


def read_tiny(data_dir: Path, *, download: bool = True, seed: int = 0) -> tuple:
    """The test's dataset: tiny.npz in data_dir (24-pixel images of 4 classes)."""
    path = Path(data_dir) / "tiny.npz"
    if not path.is_file():
        raise UserError(f"no tiny.npz in {data_dir}")
    arrays = np.load(path)
    return (arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"],
            str(data_dir))


def write_tiny(folder: Path) -> Path:
    """200 training and 40 test images whose class sets the colour, saved as the reader expects."""
    rng = np.random.default_rng(0)

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(count) % TINY_CLASSES
        colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[labels]
        noise = rng.normal(0, 20, size=(count, TINY_SIZE, TINY_SIZE, 3))
        return np.clip(colours[:, None, None, :] + noise, 0, 255).astype(np.uint8), labels.astype(np.int64)

    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = draw(200)
    test_images, test_labels = draw(40)
    np.savez(folder / "tiny.npz", train_images=train_images, train_labels=train_labels, test_images=test_images,
             test_labels=test_labels)
    return folder


@pytest.fixture
def tiny_dataset(tmp_path):
    """The 24-pixel dataset registered for the test (blur kernel 5, crops 24 and 12), removed afterwards."""
    register_dataset(DatasetEntry(name="tiny_test", read=read_tiny, num_classes=TINY_CLASSES, image_size=TINY_SIZE,
                                  mean=None, std=None, crop_sizes=(TINY_SIZE, TINY_SIZE // 2), blur_kernel_size=5))
    yield ["--dataset", "tiny_test", "--data_dir", str(write_tiny(tmp_path / "data"))]
    DATASETS.pop("tiny_test")


@pytest.mark.parametrize("client_exec", ["loop", "vmap"])
def test_a_dataset_registered_here_trains_resumes_and_evaluates(tmp_path, tiny_dataset, client_exec):
    options = [*tiny_dataset, *SMALL, "--K", "32", "--K_dim", "8", "--client_exec", client_exec]
    state = check_trains_resumes_and_evaluates(tmp_path, "moco", options, eval_options=tiny_dataset[2:])
    assert state["args"]["dataset"] == "tiny_test"


@pytest.mark.parametrize("use_dali", [False, True], ids=["torch", "dali"])
def test_both_data_paths_make_the_views_of_a_registered_dataset(tmp_path, tiny_dataset, use_dali):
    if use_dali:
        pytest.importorskip("nvidia.dali")
    options = [*tiny_dataset, *SMALL, "--feat_dim", "8", "--hidden_mlp", "16", "--nmb_prototypes", "6",
               "--output_dir", str(tmp_path / "run")]
    if use_dali:
        options += ["--use_dali", "--dali_device", "cpu"]
    args = parse_args("swav", options)
    assert args.size_crops == [TINY_SIZE, TINY_SIZE // 2]  # SwAV's crop sizes default to the dataset's
    (tmp_path / "run").mkdir()
    trainer = Trainer(args, Runtime(device=torch.device("cpu")), tmp_path / "run")
    batch = next(trainer.data.loaders.train.epoch(0))
    assert [crop.shape[-1] for crop in batch.crops] == [24, 24] + [12] * 6
    train = trainer.data.loaders.train
    if use_dali:
        assert train.augmenter.blur_kernel_size == 5
    else:
        blurs = [t.transforms[0] for t in train.dataset.crop_transforms[0].transforms
                 if type(t).__name__ == "RandomApply" and type(t.transforms[0]).__name__ == "GaussianBlur"]
        assert [repr(blur) for blur in blurs] == ["GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))"]
    loss, _ = trainer.train_step(batch.to(torch.device("cpu")))
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------ a backbone
class ConvUnit(nn.Module):
    """conv 3x3 (stride), GroupNorm, ReLU; its forward calls only its children, so the grouped engine packs it."""

    channel_packable = True

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.GroupNorm(2, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x)))


class PooledConvUnit(ConvUnit):
    """A ConvUnit followed by 2x2 average pooling; not declared packable, so the vectorised engine uses vmap."""

    channel_packable = False

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(super().forward(x), 2)


def tiny_units(width: int, use_ws: bool) -> "dict[str, nn.Module]":
    from collections import OrderedDict

    return OrderedDict(stem=ConvUnit(3, width, 1), pooled=PooledConvUnit(width, 2 * width, 1),
                       last=ConvUnit(2 * width, 4 * width, 2))


def initialise_tiny(backbone: nn.Module, plain_units: Sequence[str]) -> None:
    if plain_units:
        raise UserError("TinyNet has no shortcuts to remove (--disable_c_residual)")
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


@pytest.fixture
def tiny_net():
    """A three-unit backbone registered for the test, removed afterwards."""
    register_architecture(Architecture(name="TinyNet", unit_names=("stem", "pooled", "last"), build_units=tiny_units,
                                       feature_dim=lambda width: 4 * width, initialise=initialise_tiny))
    yield "TinyNet"
    ARCHITECTURES.pop("tinynet")


@pytest.mark.parametrize("cutlayer, engine", [("1", "grouped"), ("2", "vmap")])
def test_a_backbone_registered_here_trains_with_both_engines_alike(tmp_path, tiny_net, cutlayer, engine):
    options = ["--dataset", "synthetic", *SMALL, "--arch", tiny_net, "--cutlayer", cutlayer, "--K", "32",
               "--K_dim", "8"]
    trainers = {}
    for client_exec in ("loop", "vmap"):
        folder = tmp_path / client_exec
        folder.mkdir()
        args = parse_args("moco", [*options, "--client_exec", client_exec, "--output_dir", str(folder)])
        trainers[client_exec] = Trainer(args, Runtime(device=torch.device("cpu")), folder)
    assert trainers["vmap"].clients.engine == engine
    batches = trainers["loop"].data.loaders.train.epoch(0)
    for trainer in trainers.values():
        trainer.set_learning_rates(0, 0)
    for step in range(2):
        batch = next(batches)
        loop_loss, _ = trainers["loop"].train_step(batch)
        vmap_loss, _ = trainers["vmap"].train_step(batch)
        torch.testing.assert_close(vmap_loss, loop_loss, rtol=1e-4, atol=2e-4)
        for trainer in trainers.values():
            trainer.global_step = step + 1
    with pytest.raises(UserError, match="--cutlayer 4 is past TinyNet, which has 3 cut points"):
        parse_args("moco", [*options, "--cutlayer", "4"])
    check_trains_resumes_and_evaluates(tmp_path / "resume", "moco", [*options, "--client_exec", "vmap"])
