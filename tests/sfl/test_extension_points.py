"""Extension points of the loop, grown from this file without touching the project's: a FedAvg rule and a privacy
defence registered here train through the normal loop, are checkpointed as parts of the run and resume exactly (2
steps, then --resume to 4, gives the 4-step run's weights, losses and part states bit for bit); the options that
choose them combine with their older spellings (--divergence_aware, --enable_ressfl) and refuse contradictions."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from configs import parse_args
from functions.core.checkpoint import CHECKPOINT_NAME, FORMAT_1_PARTS, load_checkpoint, save_atomic
from functions.core.errors import UserError
from functions.privacy.defences import (
    DEFENCES,
    DefenceSetting,
    PrivacyDefence,
    SmashedStep,
    build_defences,
    register_defence,
    selected_defences,
)
from functions.sfl.fedavg_rules import FEDAVG_RULES, FedAvgRule, build_fedavg_rule, register_fedavg_rule
from functions.train.runner import run

pytestmark = pytest.mark.usefixtures("one_thread")

# 32 steps per epoch; --avg_freq 32: a FedAvg after every step, so the rule acts before and after the resume.
TINY = ["--dataset", "synthetic", "--arch", "ResNet18", "--width", "4", "--num_workers", "0", "--K", "32",
        "--K_dim", "8", "--num_epoch", "1", "--skip_linear", "--eval_freq", "0", "--log_freq", "1", "--seed", "3",
        "--num_client", "2", "--batch_size", "8", "--avg_freq", "32"]


# ------------------------------------------------------------------------------------------------ a FedAvg rule
class RunningMeanFedAvg(FedAvgRule):
    """Every client loads a running mean of the averages so far (FedAvg with server momentum, roughly): what it
    keeps (the mean and the number of aggregations) must survive a resume for the run to continue exactly."""

    decay = 0.5

    def __init__(self, options: object) -> None:
        super().__init__(options)
        self.aggregations = 0
        self.mean: dict[str, Tensor] = {}

    def global_state(self, average: dict[str, Tensor]) -> dict[str, Tensor]:
        self.aggregations += 1
        for name, value in average.items():
            if name in self.mean and value.is_floating_point():
                value = self.decay * self.mean[name] + (1 - self.decay) * value
            self.mean[name] = value.clone()
        return {name: value.clone() for name, value in self.mean.items()}

    def state_dict(self) -> dict:
        return {"aggregations": self.aggregations, "mean": {name: value.clone() for name, value in self.mean.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.aggregations = int(state["aggregations"])
        self.mean = {name: value.clone() for name, value in state["mean"].items()}


# ---------------------------------------------------------------------------------------------- a privacy defence
@dataclass(frozen=True)
class CentringOptions:
    """The run options the defence reads."""

    batch_size: int


class CentringDefence(PrivacyDefence):
    """Pulls each step's smashed rows of the first crop towards their running mean (a made-up defence): its running
    mean and step count must survive a resume for the run to continue exactly."""

    options_type = CentringOptions
    strength = 0.05

    def __init__(self, options: CentringOptions, setting: DefenceSetting) -> None:
        super().__init__(options, setting)
        self.steps = 0
        self.mean: Tensor | None = None

    def client_gradients(self, step: SmashedStep) -> tuple[list[Tensor | None], dict[str, Tensor]]:
        rows = step.smashed[0].detach().float()
        batch_mean = rows.mean(dim=0)
        self.mean = batch_mean if self.mean is None else 0.9 * self.mean + 0.1 * batch_mean
        self.steps += 1
        gradient = self.strength * (rows - self.mean) / self.options.batch_size
        extra: list[Tensor | None] = [gradient.to(step.smashed[0].dtype), *[None] * (len(step.smashed) - 1)]
        return extra, {"centring_distance": (rows - self.mean).norm(dim=1).mean()}

    def state_dict(self) -> dict:
        return {"steps": self.steps, "mean": None if self.mean is None else self.mean.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.mean = None if state["mean"] is None else state["mean"].clone()


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> dict:
    """The checkpoint of the same 4 steps with plain FedAvg and no defence."""
    return train(tmp_path_factory.mktemp("plain"), "--max_steps", "4")


@pytest.fixture
def running_mean_rule():
    """The rule registered for the test, removed afterwards."""
    register_fedavg_rule("running_mean_test")(RunningMeanFedAvg)
    yield "running_mean_test"
    FEDAVG_RULES.pop("running_mean_test")


@pytest.fixture
def centring_defence():
    """The defence registered for the test, removed afterwards."""
    register_defence("centring_test")(CentringDefence)
    yield "centring_test"
    DEFENCES.pop("centring_test")


# --------------------------------------------------------------------------------------------------- helpers
def train(output_dir: Path, *options: str) -> dict:
    """Train a tiny MoCo run into output_dir; its checkpoint."""
    run(parse_args("moco", [*TINY, "--output_dir", str(output_dir), *options]))
    return load_checkpoint(output_dir / CHECKPOINT_NAME)


def _client_weights(state: dict) -> Tensor:
    """Every floating tensor of client 0's model in a checkpoint, flattened into one."""
    return torch.cat([value.flatten() for value in state["clients"]["models"][0].values() if value.is_floating_point()])


def _same(expected, actual, where: str = "") -> None:
    """Nested states equal bit for bit."""
    if isinstance(expected, Tensor):
        assert torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            _same(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for index, (e, a) in enumerate(zip(expected, actual)):
            _same(e, a, f"{where}[{index}]")
    else:
        assert expected == actual, where


def _as_format_1(path: Path) -> None:
    """Rewrite a checkpoint as format 1 wrote it: each part under a key of its own, None for a part the run lacks."""
    state = load_checkpoint(path)
    parts = state.pop("parts")
    state.update({key: parts.pop(part, None) for key, part in FORMAT_1_PARTS.items()}, format=1)
    assert not parts  # every part of the run has a format-1 key
    save_atomic(state, path)


def _resumes_exactly(tmp_path: Path, *options: str, format_1: bool = False) -> dict:
    """4 steps straight == 2 steps, then --resume to 4 (from a format-1 checkpoint with `format_1`): weights,
    optimizers, parts and losses; the checkpoint."""
    straight = train(tmp_path / "straight", "--max_steps", "4", *options)
    train(tmp_path / "split", "--max_steps", "2", *options)
    if format_1:
        _as_format_1(tmp_path / "split" / CHECKPOINT_NAME)
    resumed = train(tmp_path / "split", "--max_steps", "4", "--resume", *options)
    for key in ("method", "clients", "server_optimizer", "parts"):
        _same(straight[key], resumed[key], key)
    losses = [json.loads((tmp_path / run_dir / "metrics.json").read_text())["train_loss"]
              for run_dir in ("straight", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    return straight


# ----------------------------------------------------------------------------------------------------- tests
def test_a_fedavg_rule_registered_here_trains_checkpoints_and_resumes_exactly(tmp_path, running_mean_rule, plain_run):
    state = _resumes_exactly(tmp_path, "--fedavg_rule", running_mean_rule)
    part = state["parts"][f"fedavg.{running_mean_rule}"]
    assert part["aggregations"] == 4 and part["mean"]  # one FedAvg after each step, its state saved
    # The rule acted: every client holds its running mean, not the plain average of the last step.
    assert not torch.equal(_client_weights(plain_run), _client_weights(state))
    for name, value in part["mean"].items():
        assert torch.equal(state["clients"]["models"][1][name], value.to(state["clients"]["models"][1][name].dtype))


def test_a_defence_registered_here_trains_checkpoints_and_resumes_exactly(tmp_path, centring_defence, plain_run):
    state = _resumes_exactly(tmp_path, "--defence", centring_defence)
    part = state["parts"][f"defence.{centring_defence}"]
    assert part["steps"] == 4 and part["mean"] is not None
    assert state["metrics"]["centring_distance"][0][1] > 0  # its statistics are logged like the method's
    assert not torch.equal(_client_weights(plain_run), _client_weights(state))


def test_format_1_checkpoints_resume_their_parts_exactly(tmp_path):
    # Divergence-aware FedAvg, ResSFL, communication saving and the method's queue, each under its format-1 key.
    _resumes_exactly(tmp_path, "--divergence_aware", "--div_lambda", "0.5", "--enable_ressfl", "--ressfl_alpha", "2",
                     "--ressfl_target_ssim", "0.1", "--MIA_arch", "conv_normN0C8", "--loss_threshold", "0.1",
                     format_1=True)


def test_the_defence_receives_its_typed_options(centring_defence):
    args = parse_args("moco", [*TINY, "--defence", centring_defence])
    setting = DefenceSetting(torch.nn.Identity(), 32, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    (defence,) = build_defences(args, lambda: setting)
    assert defence.options == CentringOptions(batch_size=8) and defence.setting is setting


@pytest.mark.parametrize("options, rule", [([], "fedavg"), (["--divergence_aware"], "divergence_aware"),
                                           (["--fedavg_rule", "divergence_aware"], "divergence_aware"),
                                           (["--fedavg_rule", "divergence_aware", "--divergence_aware"],
                                            "divergence_aware")])
def test_divergence_aware_is_the_rule_of_that_name(options, rule):
    assert build_fedavg_rule(parse_args("moco", [*TINY, *options])).name == rule


@pytest.mark.parametrize("options, message", [
    (["--divergence_aware", "--fedavg_rule", "fedavg"], "--divergence_aware selects --fedavg_rule divergence_aware"),
    (["--fedavg_rule", "median"], "unknown --fedavg_rule 'median'"),
    (["--enable_ressfl", "--defence", "centring_test"], "--enable_ressfl selects --defence ressfl"),
    (["--defence", "noise"], "unknown --defence 'noise'"),
    (["--defence", "ressfl", "ressfl"], "names a defence twice"),
    (["--defence", "centring_test", "--scheme", "fl"], "--scheme fl sends none")])
def test_contradicting_options_are_refused_in_one_line(centring_defence, options, message):
    with pytest.raises(UserError, match=message):
        parse_args("moco", [*TINY, *options])


def test_defence_ressfl_is_enable_ressfl():
    assert selected_defences(None, True) == selected_defences(["ressfl"], False) == ["ressfl"]
    assert selected_defences(["ressfl"], True) == ["ressfl"] and selected_defences(None, False) == []
    parse_args("moco", [*TINY, "--defence", "ressfl", "--ressfl_alpha", "1"])  # ResSFL's options accept either
