"""The server-method contract is complete: a method written from ServerMethod's docstring alone (SimSiam here)
trains under torchrun as in one process, and the base class puts the server under DDP without changing checkpoints."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchrun_runs import assert_same_run, launch, losses

from configs import parse_args
from functions.core.distributed import GlobalBatchNorm1d, Runtime
from functions.data.datasets import DatasetEntry
from functions.data.layout import StepLayout
from functions.data.views import ViewSpec
from functions.methods.base import ServerMethod, StepContext
from functions.methods.registry import register_method
from functions.train.runner import run
from models.split import Head, HeadBuilder

REPO_ROOT = Path(__file__).resolve().parents[2]
METHOD_NAME = "simsiam_contract"
PROJECTION_DIM, PREDICTOR_DIM = 8, 4

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


# ------------------------------------------------------------------------------- a method from the docstring
class ProjectionAndPrediction(nn.Module):
    """SimSiam's head: a projection (with BatchNorm) and a predictor on it; outputs [projection, prediction]."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(feature_dim, PROJECTION_DIM), nn.BatchNorm1d(PROJECTION_DIM),
                                        nn.ReLU(), nn.Linear(PROJECTION_DIM, PROJECTION_DIM))
        self.predictor = nn.Sequential(nn.Linear(PROJECTION_DIM, PREDICTOR_DIM), nn.ReLU(),
                                       nn.Linear(PREDICTOR_DIM, PROJECTION_DIM))

    def forward(self, features: Tensor) -> Tensor:
        projection = self.projection(features)
        return torch.cat([projection, self.predictor(projection)], dim=1)


def negative_cosine(prediction: Tensor, target: Tensor) -> Tensor:
    """SimSiam's D: mean negative cosine similarity of predictions to stop-gradient targets."""
    return -F.cosine_similarity(prediction, target.detach(), dim=1).mean()


class ContractSimSiam(ServerMethod):
    """SimSiam: both views through the server, each view's prediction against the other's projection."""

    trainable_crops = (0, 1)

    @classmethod
    def head_builder(cls, args: argparse.Namespace) -> HeadBuilder:
        return lambda feature_dim: Head(ProjectionAndPrediction(feature_dim))

    @classmethod
    def view_spec(cls, args: argparse.Namespace, dataset: DatasetEntry) -> ViewSpec:
        return ViewSpec((2,), (dataset.crop_sizes[0],), (0.2,), (1.0,), blur_kernel_size=dataset.blur_kernel_size)

    def compute_loss(self, smashed: Sequence[Tensor], momentum_smashed: Sequence[Tensor],
                     context: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        projections, predictions = self.forward_server(torch.cat(list(smashed))).split(PROJECTION_DIM, dim=1)
        first, second = projections.chunk(2)
        first_prediction, second_prediction = predictions.chunk(2)
        loss = 0.5 * (negative_cosine(first_prediction, second) + negative_cosine(second_prediction, first))
        return loss, {}


def register_simsiam() -> str:
    """Make ContractSimSiam known to the registry of this process (the torchrun children call it); its name."""
    register_method(METHOD_NAME, description="SimSiam written from the ServerMethod docstring")(ContractSimSiam)
    return METHOD_NAME


# ----------------------------------------------------------------------------------------- under torchrun
# Each process imports this file and registers the method before it parses the options.
ENTRY_SCRIPT = """import sys
sys.path[:0] = {paths!r}
from configs import parse_args
from functions.core.errors import run_cli
from functions.train.runner import run
import test_contract
run_cli(lambda: run(parse_args(test_contract.register_simsiam(), sys.argv[1:])))
"""

TINY = ["--dataset", "synthetic", "--arch", "ResNet18", "--width", "4", "--num_client", "2", "--batch_size", "8",
        "--max_steps", "2", "--log_freq", "1", "--skip_linear", "--eval_freq", "0", "--num_workers", "0",
        "--seed", "7", "--client_exec", "loop", "--device", "cpu"]


def test_a_method_from_the_docstring_trains_under_torchrun_as_in_one_process(tmp_path):
    entry = tmp_path / "run_contract_simsiam.py"
    paths = [str(REPO_ROOT), str(REPO_ROOT / "tests" / "helpers"), str(Path(__file__).parent)]
    entry.write_text(ENTRY_SCRIPT.format(paths=paths))
    runs = {processes: tmp_path / f"processes{processes}" for processes in (1, 2)}
    run(parse_args(register_simsiam(), [*TINY, "--output_dir", str(runs[1])]))  # one process: this one
    result = launch(str(entry), [*TINY, "--output_dir", str(runs[2])], 2, forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # Same losses and the same server, clients and optimizer state after 2 steps (one full step and the next).
    assert len(losses(runs[2])) == 2
    assert_same_run(runs[1], runs[2], loss_tolerance=1e-5, weight_tolerance=1e-4)


# ---------------------------------------------------------------------------------------- the base class
def tiny_method(args: argparse.Namespace | None = None) -> ContractSimSiam:
    """The method on a server of one Linear layer and its head."""
    server = nn.Sequential(nn.Linear(4, 4), ProjectionAndPrediction(4))
    return ContractSimSiam(args or argparse.Namespace(), server, torch.device("cpu"))


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone (DDP needs one), removed afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield Runtime(device=torch.device("cpu"), world_size=1)
    dist.destroy_process_group()


def test_distribute_puts_forward_server_through_ddp_and_keeps_the_checkpoint_keys(one_process_group, monkeypatch):
    method = tiny_method()
    keys = list(method.state_dict())
    assert not method.distributed
    method.distribute(one_process_group)
    assert method.distributed and list(method.state_dict()) == keys
    assert isinstance(method.server[1].projection[1], GlobalBatchNorm1d)
    wrapped = []
    forward = DistributedDataParallel.forward
    monkeypatch.setattr(DistributedDataParallel, "forward",
                        lambda ddp, *inputs: wrapped.append(ddp.module) or forward(ddp, *inputs))
    context = StepContext(0, StepLayout.of([0], [3]))
    loss, _ = method.compute_loss([torch.randn(3, 4), torch.randn(3, 4)], [], context)
    loss.backward()
    assert wrapped == [method.server]


def test_distribute_refuses_parameters_outside_the_server():
    method = tiny_method()
    method.predictor = nn.Linear(4, 4)  # trained by the optimizer, but DDP would not average it
    method.optimized_parameters = lambda: [*method.server.parameters(), *method.predictor.parameters()]
    with pytest.raises(TypeError, match="outside its server"):
        method.distribute(Runtime(device=torch.device("cpu")))
