"""--client_exec auto: the engine the benchmark found faster for the device, client part and batch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from configs import parse_args
from functions.core.distributed import Runtime
from functions.core.precision import MixedPrecision
from functions.sfl.clients.engines import auto_client_exec, widest_convolution
from functions.sfl.clients.loop import ClientSide
from functions.sfl.clients.vmap import VectorisedClientSide
from functions.sfl.step import build_split_step
from models.split import build_split_model

CPU = torch.device("cpu")

# Vectorised step speed / loop step speed on the 2-core CPU, MoCo, ResNet-18, modes timed in turns, 5 repetitions:
#   python benchmarks/bench_sfl.py --device cpu --threads 2 --method moco --clients 100 --per_client_batch 1 \
#       --width W --cutlayer 1 2 --modes loop vmap --steps 2 --warmup 1 --repeats 5      (and --clients 10 --per_client_batch 8)
# the last row with --method_config configs/mocosfl_table3_100clients.yaml (MocoSFL's V2 head, K 6000) and
# centralised too. Differences under 5 % are within the repetitions' spread: either engine is right there.
# Then two more of that last row (the same command with --repeats 7, --modes loop vmap and vmap loop). Then the
# loop and vmap sides of the peer benchmark, each engine in a process of its own as in a real run (median of the
# round-by-round ratios):
#   python benchmarks/peer_mocosfl.py --peer_dir DIR --width W --settings 100x1 10x8 --steps S --warmup 2 --repeats 7
# (S = 4 at width 16, 3 at width 64; MocoSFL's V2 head, K 6000, symmetric loss), and the last row with
#   python benchmarks/peer_mocosfl.py --peer_dir DIR --width W --cutlayer C --settings 10x8 --sides loop vmap \
#       --steps 3 --warmup 2 --repeats 7
MEASURED = [  # (width, images per client, cut, vmap / loop speed)
    (16, 1, 1, 1.07), (16, 1, 2, 1.43), (16, 8, 1, 1.01), (16, 8, 2, 1.07),
    (32, 1, 1, 1.03), (32, 1, 2, 1.22), (32, 8, 1, 0.97), (32, 8, 2, 0.98),
    (64, 1, 1, 1.02), (64, 1, 2, 1.02), (64, 8, 1, 1.02), (64, 8, 2, 0.98), (64, 8, 2, 0.93),
    (64, 8, 2, 0.93), (64, 8, 2, 0.91),
    (16, 1, 2, 1.45), (16, 1, 2, 1.62), (16, 8, 2, 1.04), (16, 8, 2, 1.08),
    (64, 1, 2, 1.08), (64, 1, 2, 1.14), (64, 8, 2, 1.04), (64, 8, 2, 1.03),
    (32, 8, 1, 1.05), (32, 8, 2, 1.07), (64, 8, 1, 0.98), (64, 8, 2, 1.05),
]
NOISE = 0.05


@pytest.mark.parametrize("width, rows, cutlayer, speedup", MEASURED)
def test_auto_never_picks_the_engine_the_benchmark_measured_slower(width, rows, cutlayer, speedup) -> None:
    client = build_split_model("ResNet18", cutlayer, width=width).client
    choice = auto_client_exec(client, CPU, rows)
    if speedup > 1 + NOISE:
        assert choice == "vmap"
    elif speedup < 1 - NOISE:
        assert choice == "loop"


def test_auto_runs_gpus_vectorised_and_client_parts_with_buffers_in_the_loop() -> None:
    client = build_split_model("ResNet18", 2, width=64).client
    assert auto_client_exec(client, torch.device("cuda"), 8) == "vmap"
    with_batchnorm = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    assert auto_client_exec(with_batchnorm, torch.device("cuda"), 1) == "loop"  # the vectorised engine refuses it
    assert widest_convolution(client) == 64 and widest_convolution(nn.Linear(3, 4)) == 0


@pytest.mark.parametrize("width, batch, engine", [(8, 2, VectorisedClientSide), (64, 8, ClientSide)])
def test_the_default_builds_the_chosen_engine(width, batch, engine) -> None:
    args = parse_args("moco", ["--width", str(width), "--batch_size", str(batch), "--num_client", "2",
                               "--K", "64", "--K_dim", "16"])
    assert args.client_exec == "auto"
    runtime = Runtime(device=CPU)
    step = build_split_step(args, runtime, MixedPrecision(None, runtime))
    assert type(step.clients) is engine
