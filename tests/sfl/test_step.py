"""This project's SFL-MoCo step against MocoSFL's own, step by step (fixture: benchmarks/golden/moco_step.py).

Same weights (MocoSFL's parameter names mapped onto this project's by functions.expert), same images, same initial
queues, the learning rates MocoSFL used; 3 steps with FedAvg after each, for V1 / V2 / largeV2 x shared or
per-client queues x plain or symmetric loss, with both client engines. Per step: the loss, the gradient the server
sends to the clients, every client's weights and momentum copy, the server and its momentum encoder, the queues and
their pointers.

Tolerances: both sides run float32, with sums in other orders (grouped or per-client convolutions, one stacked pass
or separate ones for heads without BatchNorm, FedAvg's weighted mean or MocoSFL's sum then divide). Each summarised
tensor (sum, norm, two random projections) may differ by TOLERANCE of its norm, or by 20 times MocoSFL's own float32
error (the fixture's `sensitivity`: its distance from the same run in float64) when that is larger. The momentum
copies, the momentum encoder, the keys and the queues are moving averages of the weights: they agree to 1e-7..1e-5
of their norms (tolerances 1e-5..3e-4). The smashed data of the clients, the gradients and the trained weights go
through ReLUs: a pre-activation within rounding of 0 lands on the other side in one of the two programs and moves
its row's gradient by a few % (measured: 3 % for one row of V1-per_client-plain at step 2, where MocoSFL's float32
and float64 runs differ as much), hence 5e-3 of the norm for weights and smashed data and 0.1 for the gradient. A
difference this fixture pins moves a value far more: BatchNorm statistics of both views together change the first
loss by 50 %, enqueuing both keys per client changes the pointers, moving the client momentum copies before FedAvg
moves them by 1e-2 of their norm at step 1, the server's momentum update after its step by 0.1.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any

import pytest
import torch
from paths import REPO_ROOT

from configs import parse_args
from functions.core.distributed import Runtime
from functions.core.precision import MixedPrecision
from functions.data.loaders import StepBatch
from functions.privacy.expert import mocosfl_client_state, mocosfl_server_state
from functions.sfl.fedavg import fedavg, fedavg_positions
from functions.sfl.step import build_split_step

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "mocosfl" / "moco_step"
CPU = Runtime(device=torch.device("cpu"))


def _golden_module() -> Any:
    """benchmarks/golden/moco_step.py (its seeded weights, images and summaries; it imports no MocoSFL here)."""
    folder = REPO_ROOT / "benchmarks" / "golden"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))  # its `import peer` (standard library and torch only)
    spec = importlib.util.spec_from_file_location("golden_moco_step", folder / "moco_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


golden = _golden_module()


@pytest.fixture(scope="module")
def fixture() -> tuple[dict, dict]:
    if not FIXTURE.with_suffix(".json").is_file():
        pytest.skip("tests/fixtures/mocosfl/moco_step.json is absent (python benchmarks/golden/moco_step.py)")
    values = json.loads(FIXTURE.with_suffix(".json").read_text())
    tensors = torch.load(FIXTURE.with_suffix(".pt"), weights_only=True)
    return values, tensors


def _seeded(keys: list, part: str, seed: int) -> dict[str, torch.Tensor]:
    return {name: golden.seeded_parameter(seed, f"{part}.{name}", tuple(shape)) for name, shape in keys}


def _names(mapping: Any, keys: list) -> list[str]:
    """This project's name of every MocoSFL parameter, in MocoSFL's order."""
    return [next(iter(mapping({name: torch.zeros(1)}))) for name, _ in keys]


def _flat(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[name].detach().flatten() for name in names])


def _build(settings: dict, version: str, per_client: bool, symmetric: bool, engine: str, case: dict,
           initial_queues: torch.Tensor) -> Any:
    """This project's SplitStep for the case, with MocoSFL's weights and initial queues."""
    options = ["--arch", "ResNet18", "--width", str(settings["width"]), "--cutlayer", str(settings["cutlayer"]),
               "--num_client", str(settings["num_client"]), "--batch_size", str(settings["rows"]),
               "--moco_version", version, "--K", str(settings["K"]), "--K_dim", str(settings["K_dim"]),
               "--T", str(settings["T"]), "--lr", str(settings["lr"]), "--c_lr", str(settings["lr"]),
               "--momentum", str(settings["momentum"]), "--weight_decay", str(settings["weight_decay"]),
               "--moco_momentum", str(settings["moco_momentum"]), "--client_exec", engine,
               "--symmetric" if symmetric else "--no-symmetric"]
    args = parse_args("moco", options + (["--disable_feature_sharing"] if per_client else []))
    step = build_split_step(args, CPU, MixedPrecision(None, CPU))
    seed, cut = settings["seed"], settings["cutlayer"]
    client = mocosfl_client_state(_seeded(case["client_parameters"], "client", seed), "ResNet18", cut)
    server = mocosfl_server_state(_seeded(case["server_parameters"], "server", seed), "ResNet18", cut, 0)
    step.clients.set_every_client(_complete(step.clients.stacked_state([0]), client))
    step.clients.set_every_client(_complete(step.clients.stacked_state([0], momentum_copies=True), client),
                                  momentum_copies=True)
    for module in (step.method.server, step.method.server_momentum):
        missing, unexpected = module.load_state_dict(server, strict=False)
        assert not unexpected and all("running" in key or "num_batches" in key for key in missing)
    queues = step.method.queues
    for index, queue in enumerate(queues.clients if per_client else [queues.shared]):
        queue.negatives.copy_(initial_queues[index])
    return step


def _complete(stacked: dict[str, torch.Tensor], parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client state: `parameters`, and the engine's own values (row 0) for anything else (buffers)."""
    return {name: parameters.get(name, value[0]) for name, value in stacked.items()}


# Relative to the norm of the summarised tensor (to the loss itself for the loss).
TOLERANCE = {"loss": 1e-4, "smashed_key": 1e-4, "client_momentum": 1e-5, "server_momentum": 1e-5, "queues": 3e-4,
             "smashed_query": 5e-3, "clients": 5e-3, "server": 5e-3, "gradient": 1e-1}
FACTOR = 20.0


def _close(ours: list[float], expected: dict, key: str, what: str, index: int | None = None) -> None:
    """Summaries (sum, norm, projections) equal within TOLERANCE[key] of the norm or FACTOR x MocoSFL's own
    float32 error (its distance from the same run in float64)."""
    theirs = expected[key] if index is None else expected[key][index]
    tolerance = max(TOLERANCE[key] * abs(theirs[1]), FACTOR * expected["sensitivity"][key])
    assert ours == pytest.approx(theirs, rel=0, abs=tolerance), what


@pytest.mark.parametrize("engine", ["loop", "vmap"])
@pytest.mark.parametrize("version,per_client,symmetric", golden.cases(),
                         ids=[golden.case_name(*case) for case in golden.cases()])
def test_steps_match_mocosfl(fixture: tuple[dict, dict], version: str, per_client: bool, symmetric: bool,
                             engine: str) -> None:
    values, tensors = fixture
    settings, name = values["settings"], golden.case_name(version, per_client, symmetric)
    case = values[name]
    step = _build(settings, version, per_client, symmetric, engine, case, tensors[name]["initial_queues"])
    clients = list(range(settings["num_client"]))
    client_names = _names(lambda s: mocosfl_client_state(s, "ResNet18", settings["cutlayer"]),
                          case["client_parameters"])
    server_names = _names(lambda s: mocosfl_server_state(s, "ResNet18", settings["cutlayer"], 0),
                          case["server_parameters"])
    averaged_after = fedavg_positions(settings["steps"], settings["avg_freq"])
    for number, expected in enumerate(case["steps"]):
        views = [golden.synthetic_views(settings["seed"], number, client) for client in clients]
        rows = settings["rows"]
        batch = StepBatch(crops=[torch.cat([v[0] for v in views]), torch.cat([v[1] for v in views])],
                          client_ids=clients, rows_per_client=[rows] * len(clients),
                          sample_indices=torch.arange(rows * len(clients)))
        step.server_optimizer.param_groups[0]["lr"] = expected["server_lr"]
        assert len(set(expected["client_lr"])) == 1
        step.clients.set_lr(expected["client_lr"][0])
        sent: dict[str, Any] = {}
        loss, stats = step(batch, epoch=0, global_step=number,
                       record=lambda inputs, momentum: sent.update(query=inputs[0], key=momentum[0]))
        assert (number in averaged_after) == expected["fedavg"]
        if number in averaged_after:
            fedavg(step.clients, clients, [1] * len(clients), CPU)
        where = f"{name} {engine} step {number + 1}"
        assert loss.item() == pytest.approx(expected["loss"], rel=TOLERANCE["loss"],
                                            abs=FACTOR * expected["sensitivity"]["loss"]), f"{where}: loss"
        if not symmetric:  # with --symmetric MocoSFL reports the accuracy of its second term only
            assert stats["contrastive_acc"].item() * 100 == pytest.approx(expected["accuracy_percent"], abs=1e-3)
        _close(golden.summary(sent["key"]), expected, "smashed_key", f"{where}: the momentum copies' smashed data")
        _close(golden.summary(sent["query"]), expected, "smashed_query", f"{where}: the clients' smashed data")
        _close(golden.summary(sent["query"].grad), expected, "gradient", f"{where}: the gradient sent to the clients")
        for client in clients:
            _close(golden.summary(_flat(step.clients.stacked_state([client]), client_names)), expected, "clients",
                   f"{where}: client {client}", client)
            _close(golden.summary(_flat(step.clients.stacked_state([client], momentum_copies=True), client_names)),
                   expected, "client_momentum", f"{where}: client {client}'s momentum copy", client)
        _close(golden.summary(_flat(step.method.server.state_dict(), server_names)), expected, "server",
               f"{where}: server")
        _close(golden.summary(_flat(step.method.server_momentum.state_dict(), server_names)), expected,
               "server_momentum", f"{where}: server momentum encoder")
        queues = step.method.queues.clients if per_client else [step.method.queues.shared]
        assert [queue.pointer for queue in queues] == expected["pointers"], f"{where}: queue pointers"
        for index, queue in enumerate(queues):
            _close(golden.summary(queue.negatives), expected, "queues", f"{where}: queue {index}", index)
