"""The ResSFL defence: its options, the simulated attacker's penalty and its checkpoint."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from sfl_helpers import run_moco_with_bottleneck

from configs import parse_args
from functions.core.checkpoint import CHECKPOINT_NAME, load_checkpoint
from functions.core.errors import UserError
from functions.privacy.ressfl import SimulatedAttacker, client_penalty, per_image_ssim, ressfl_penalty

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.mark.parametrize("argv, message", [
    (["--adds_bottleneck"], "--adds_bottleneck needs --bottleneck_option"),
    (["--load_server"], "--load_server needs --initialze_path"),
    (["--ressfl_alpha", "1"], "--ressfl_alpha needs --enable_ressfl"),
    (["--bottleneck_option", "C4S2", "--scheme", "fl"], "--scheme fl has no cut"),
    (["--enable_ressfl", "--scheme", "fl"], "--scheme fl sends none")])
def test_privacy_options_that_contradict_each_other_are_refused(argv, message) -> None:
    with pytest.raises(UserError, match=message):
        parse_args("moco", argv)


# ------------------------------------------------------------------------------ MocoSFL's published experts


# ---------------------------------------------------------------------------------- runs of this project

# ----------------------------------------------------------------------------------------------------- ResSFL
def test_the_penalty_is_zero_below_the_target_and_grows_above_it() -> None:
    ssim = torch.tensor([0.2, 0.5, 0.7], requires_grad=True)
    penalties = torch.stack([ressfl_penalty(value, 0.6, 2.0) for value in ssim])
    assert penalties.tolist() == pytest.approx([0.0, 0.0, 0.2])
    penalties.sum().backward()
    assert ssim.grad.tolist() == pytest.approx([0.0, 0.0, 2.0])
    assert float(ressfl_penalty(torch.tensor(0.3), 0.0, 2.0)) == pytest.approx(0.6)  # target 0: alpha * SSIM


def test_each_client_is_penalised_by_its_own_rows_weighted_by_its_share() -> None:
    image_ssim = torch.tensor([0.9, 0.9, 0.1, 0.1, 0.1, 0.1])
    # Client 0 (2 of 6 rows) is above the target, client 1 below: only client 0's excess counts, at 2/6.
    assert float(client_penalty(image_ssim, [2, 4], 0.5, 3.0)) == pytest.approx(3.0 * 0.4 * 2 / 6)
    # Under torchrun, a process holding half of the step's rows weighs its clients by the global row count.
    assert float(client_penalty(image_ssim, [2, 4], 0.5, 3.0, row_share=0.5)) == pytest.approx(3.0 * 0.4 * 2 / 12)


def _attacker_game(alpha: float, target: float, steps: int = 40) -> float:
    """A small client (two convolutions) and the simulated attacker play `steps` rounds on fixed images; the
    attacker's SSIM on the client's output at the end."""
    torch.manual_seed(0)
    client = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.Conv2d(8, 4, 3, stride=2, padding=1))
    args = argparse.Namespace(ressfl_alpha=alpha, ressfl_target_ssim=target, MIA_arch="conv_normN0C8", seed=0,
                              client_sample_ratio=1.0, batch_size=8)
    attacker = SimulatedAttacker(args, client, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    optimizer = torch.optim.SGD(client.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    smooth = F.interpolate(torch.rand(16, 3, 4, 4, generator=generator), size=16, mode="bilinear")
    images = (smooth - 0.5) / 0.25
    for _ in range(steps):
        smashed = client(images)
        gradient, _ = attacker(smashed, images, [8, 8], epoch=0)
        optimizer.zero_grad()
        smashed.backward(gradient)
        optimizer.step()
    attacker.decoder.eval()
    with torch.no_grad():
        return float(per_image_ssim(attacker.decoder(client(images)), smooth).mean())


def test_the_penalty_pushes_the_attackers_ssim_down_when_above_the_target() -> None:
    unpenalised = _attacker_game(alpha=0.0, target=0.0)
    assert unpenalised > 0.3  # the attacker learns to invert the undefended client
    assert _attacker_game(alpha=5.0, target=0.05) < unpenalised - 0.1
    # A target above what the attacker reaches leaves the client untouched: the same game as without ResSFL.
    assert _attacker_game(alpha=5.0, target=0.99) == pytest.approx(unpenalised, abs=1e-6)


def test_resume_with_the_attackers_state_continues_exactly(tmp_path) -> None:
    ressfl = ("--enable_ressfl", "--ressfl_alpha", "2", "--ressfl_target_ssim", "0.1", "--MIA_arch", "conv_normN0C8")
    straight = run_moco_with_bottleneck(tmp_path, "straight", "--max_steps", "4", *ressfl)
    split = run_moco_with_bottleneck(tmp_path, "split", "--max_steps", "2", *ressfl)
    assert load_checkpoint(split / CHECKPOINT_NAME)["parts"]["defence.ressfl"]["decoder"]
    run_moco_with_bottleneck(tmp_path, "split", "--max_steps", "4", "--resume", *ressfl)
    expected, actual = load_checkpoint(straight / CHECKPOINT_NAME), load_checkpoint(split / CHECKPOINT_NAME)
    for key, value in expected["parts"]["defence.ressfl"]["decoder"].items():
        assert torch.equal(actual["parts"]["defence.ressfl"]["decoder"][key], value), key
    for expected_client, actual_client in zip(expected["clients"]["models"], actual["clients"]["models"]):
        for key, value in expected_client.items():
            assert torch.equal(actual_client[key], value), key
    assert expected["metrics"]["train_loss"] == actual["metrics"]["train_loss"]


def test_both_client_engines_train_the_same_with_the_bottleneck_and_ressfl(tmp_path) -> None:
    ressfl = ("--enable_ressfl", "--ressfl_alpha", "2", "--ressfl_target_ssim", "0.1", "--MIA_arch", "conv_normN0C8",
              "--max_steps", "3", "--lr", "0.01")
    loop = load_checkpoint(run_moco_with_bottleneck(tmp_path, "loop", "--client_exec", "loop", *ressfl) / CHECKPOINT_NAME)
    grouped = load_checkpoint(run_moco_with_bottleneck(tmp_path, "vmap", "--client_exec", "vmap", *ressfl) / CHECKPOINT_NAME)
    assert loop["metrics"]["ressfl_penalty"][0][1] > 0  # the penalty acted
    # The engines sum in other orders, and Adam's first steps magnify those 1e-7 differences in the attacker to
    # at most 4.3e-4 in the clients after 3 steps at lr 0.01 (measured; at lr 0.06 MocoSFL's initialisation of the
    # weight-standardised convolutions, small weights and so large relative steps, let them reach 1e-2); the
    # penalty itself moves the clients by 1.2e-2 to 1.5e-2.
    for expected_client, actual_client in zip(loop["clients"]["models"], grouped["clients"]["models"]):
        for key, value in expected_client.items():
            assert torch.allclose(actual_client[key], value, atol=1e-3), key
