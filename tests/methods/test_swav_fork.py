"""--compat mocosfl for SwAV: the seed fork's (SL-FedSwAV) step loss and client gradients, against its own code.

The fixture tests/fixtures/mocosfl/swav_fork.* comes from benchmarks/golden/swav_fork.py, which ran the fork's
`compute_swav` on three clients' smashed data and a tiny server. Tolerances: float32 sums of a few hundred terms
(loss about 20, gradients about 1e-2), so 1e-5 relative plus 1e-6 absolute covers rounding and nothing more.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from paths import MOCOSFL_FIXTURES
from sfl_helpers import swav_trainer
from torch import nn

from configs import parse_args
from functions.core.errors import UserError
from functions.data.layout import StepLayout
from functions.losses.swav import seed_fork_accumulated_loss
from functions.methods.base import StepContext
from functions.methods.swav import SwavServer

FIXTURE = MOCOSFL_FIXTURES / "swav_fork"
MULTI_CROP = ["--nmb_crops", "2", "2", "--size_crops", "16", "8", "--min_scale_crops", "0.3", "0.1",
              "--max_scale_crops", "1", "0.3", "--crops_for_assign", "0", "1"]


class TinyServer(nn.Module):
    """The generator's server part (conv, ReLU, pool, linear), L2-normalised, with the prototypes beside it."""

    def __init__(self, body_state: dict, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 6))
        self.body.load_state_dict(body_state)  # same module layout as the fork's side: the keys match one to one
        self.prototypes = nn.Linear(6, prototypes.shape[0], bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(prototypes)

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:
        return F.normalize(torch.cat([self.body(group) for group in groups]), dim=1)


def _load_fixture() -> tuple[dict, dict]:
    if not FIXTURE.with_suffix(".json").is_file():
        pytest.skip("fixture absent: python benchmarks/golden/swav_fork.py --peer_dir <SL-FedSwAV checkout>")
    return json.loads(FIXTURE.with_suffix(".json").read_text()), torch.load(FIXTURE.with_suffix(".pt"))


def _method_loss(compat: str) -> tuple[SwavServer, torch.Tensor, list[torch.Tensor], dict]:
    """This project's SwAV loss on the fixture's inputs (rows crop-major over the clients), after backward."""
    values, tensors = _load_fixture()
    nmb_crops = values["nmb_crops"]
    args = parse_args("swav", ["--dataset", "synthetic", "--compat", compat, "--nmb_crops", *map(str, nmb_crops),
                               "--size_crops", "4", "2", "--min_scale_crops", "0.3", "0.1", "--max_scale_crops", "1",
                               "0.3", "--crops_for_assign", *map(str, values["crops_for_assign"]),
                               "--temperature", str(values["temperature"]), "--epsilon", str(values["epsilon"]),
                               "--sinkhorn_iterations", str(values["sinkhorn_iterations"]), "--nmb_prototypes", "5"])
    method = SwavServer(args, TinyServer(tensors["server_body"], tensors["prototypes"]), torch.device("cpu"))
    clients = tensors["client_crops"]
    smashed = [torch.cat([crops[k] for crops in clients]).requires_grad_(True) for k in range(sum(nmb_crops))]
    rows = values["rows_per_client"]
    loss, _ = method.compute_loss(smashed, [], StepContext(0, StepLayout.of(range(len(rows)), rows)))
    loss.backward()
    return method, loss.detach(), smashed, values


def test_compat_loss_and_gradients_equal_the_seed_forks():
    method, loss, smashed, values = _method_loss("mocosfl")
    _, tensors = _load_fixture()
    assert torch.allclose(loss, torch.tensor(values["loss"]), rtol=1e-5, atol=1e-6)
    # The fork's global-crop gradient is client-major (per client: crop 0 rows, crop 1 rows); ours is crop-major.
    global_crops = range(values["nmb_crops"][0])
    per_crop = [smashed[k].grad.split(values["rows_per_client"]) for k in global_crops]
    client_major = torch.cat([per_crop[k][c] for c in range(len(values["rows_per_client"])) for k in global_crops])
    assert torch.allclose(client_major, tensors["global_gradient"], rtol=1e-5, atol=1e-6)
    for name, parameter in method.server.body.named_parameters():
        assert torch.allclose(parameter.grad, tensors["server_gradients"][name], rtol=1e-5, atol=1e-6), name
    assert torch.allclose(method.prototypes.weight.grad, tensors["prototypes_gradient"], rtol=1e-5, atol=1e-6)


def test_default_loss_is_the_mean_over_all_rows_not_the_forks():
    _, default_loss, _, values = _method_loss("none")
    # One Sinkhorn over all rows and one mean: about a quarter of the fork's 1.75 l0 + 1.5 l1 + l2 for 3 clients.
    assert default_loss < values["loss"] / 2


def test_accumulated_loss_never_resets_the_per_client_sum():
    l0, l1, l2 = torch.tensor(1.0), torch.tensor(10.0), torch.tensor(100.0)
    assert torch.isclose(seed_fork_accumulated_loss([l0, l1], 2), l0 + (l0 / 2 + l1))
    assert torch.isclose(seed_fork_accumulated_loss([l0, l1, l2], 2), l0 + (l0 / 2 + l1) + (l0 / 4 + l1 / 2 + l2))


@pytest.mark.parametrize("compat, sent", [("none", [True, True, True, True]), ("mocosfl", [True, True, False, False])])
def test_client_gradients_of_local_crops_only_under_compat(tmp_path, compat, sent):
    trainer = swav_trainer(tmp_path, "--num_client", "2", "--batch_size", "4", "--compat", compat, *MULTI_CROP)
    clients = trainer.split_step.clients
    seen = []
    real_backward = clients.backward
    clients.backward = lambda gradients: seen.append([g is not None for g in gradients]) or real_backward(gradients)
    trainer.train_step(next(trainer.data.loaders.train.epoch(0)))
    assert seen == [sent]


def test_compat_refuses_the_per_client_server_update():
    with pytest.raises(UserError, match="per_client"):
        parse_args("swav", ["--dataset", "synthetic", "--compat", "mocosfl", "--server_update", "per_client"])


def test_compat_queue_gives_each_client_the_queue_before_its_own_rows(tmp_path, monkeypatch):
    import functions.methods.swav as swav

    trainer = swav_trainer(tmp_path, "--num_client", "2", "--batch_size", "4", "--queue_length", "16",
                           "--epoch_queue_starts", "0", "--compat", "mocosfl", *MULTI_CROP)
    seen_rows = []
    real_sinkhorn = swav.sinkhorn_knopp
    monkeypatch.setattr(swav, "sinkhorn_knopp",
                        lambda scores, *a, **k: seen_rows.append(scores.shape[0]) or real_sinkhorn(scores, *a, **k))
    for batch in list(trainer.data.loaders.train.epoch(0))[:3]:
        trainer.train_step(batch)
    # Per client and assignment crop: its 4 rows; each slot gets 4 rows per client, so it is full (16) after two
    # steps, and from then on every client's codes see the 16 queued rows too.
    assert seen_rows == [4] * 8 + [20] * 4


def test_overhead_counts_no_gradient_rows_for_local_crops_under_compat(tmp_path):
    default = swav_trainer(tmp_path / "default", "--num_client", "2", "--batch_size", "4", *MULTI_CROP).overhead
    compat = swav_trainer(tmp_path / "compat", "--num_client", "2", "--batch_size", "4", "--compat", "mocosfl",
                          *MULTI_CROP).overhead
    # The client's output has a quarter of the values at 8 px as at 16 px: 2 global + 2 local crops = 2.5 global
    # crops' worth up and (by default) down; under compat only the 2 global crops' gradients come down.
    assert compat.smashed_up_bytes == default.smashed_up_bytes
    assert compat.gradient_down_bytes * 2.5 == default.gradient_down_bytes * 2
    assert compat.client_flops_per_step < default.client_flops_per_step
