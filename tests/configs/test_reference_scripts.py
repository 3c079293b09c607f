"""MocoSFL's table 2 and table 3 scripts and the seed collection's run scripts, line by line, on CPU.

Every line is parsed here with its options as written. Each line also trains 2 steps on real CIFAR images (the
cifar10-mini images repeated to the full training-set size, since the scripts' 1000 clients need about 50 images
each), its paths translated, `--device cuda:N` run on the CPU and torchrun's 4 processes run as 2. By default a
covering selection trains: 5 clients with --auto_adjust, 20 sampled clients and 1000 clients, both cut layers,
CIFAR-10 and CIFAR-100, the seed's MoCo line (its torchrun line is left to SFL_SCRIPT_LINES=all; torchrun itself
is tested in tests/core/test_distributed.py). SFL_SCRIPT_LINES=all trains every line (about
half an hour on 2 cores; the seed's SwAV lines run 224-pixel crops through a CIFAR ResNet-18, 3 to 4 minutes each,
and under torchrun a rank took over 13 GB of memory). The ImageNet-12 lines parse (MocoSFL's imagnet-12 folder,
224 pixels) but do not train here: a full-width ResNet-18 at 224 pixels is too slow for a CPU; their data path is
the image folder's, tested in tests/data/test_image_folder.py.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from paths import REPO_ROOT
from reference_scripts import ScriptLine, all_script_lines, full_size_copies, translate
from torchrun_runs import free_port

from configs import parse_args
from functions.train.runner import run

LINES = all_script_lines()
RUN_ALL = os.environ.get("SFL_SCRIPT_LINES", "") == "all"


def _method(line: ScriptLine) -> str:
    return "swav" if line.entry == "run_sflswav.py" else "moco"


COVERING = {  # (script, dataset, clients, non-IID ratio, cut, seed): the lines trained by default
    ("run_sflmoco_cross_client_cifar10.sh", "cifar10", "5", "0.2", "1", None),
    ("run_sflmoco_cross_client_cifar100.sh", "cifar100", "20", "1.0", "2", None),
    ("run_sflmoco_cross_client.sh", "cifar10", "1000", "0.2", "2", "1234"),
    ("run_sflmoco_cross_client_cifar10_new.sh", "cifar10", "10", "1.0", "1", None),
}


def _key(line: ScriptLine) -> tuple:
    return (Path(line.script).name, *(line.option(name) for name in
                                      ("--dataset", "--num_client", "--noniid_ratio", "--cutlayer", "--seed")))


@pytest.fixture(scope="module")
def full_size_data(tmp_path_factory) -> Path:
    """The full-size copies, made once per test session: under pytest-xdist in the folder that holds every
    worker's temporary folders, the first worker making them while the others wait."""
    from paths import CIFAR10_MINI

    if not (CIFAR10_MINI / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 sample not found at {CIFAR10_MINI}")
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return full_size_copies(CIFAR10_MINI, tmp_path_factory.mktemp("full_size"))
    shared = tmp_path_factory.getbasetemp().parent / "full_size"
    shared.mkdir(exist_ok=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return full_size_copies(CIFAR10_MINI, shared)


def test_the_scripts_expand_to_their_lines():
    assert len(LINES) == 2 * 8 + 3 * 3 * 3 * 2 * 2 + 5
    assert len({(line.script, line.argv) for line in LINES}) == len(LINES)


@pytest.mark.parametrize("line", LINES, ids=[line.label() for line in LINES])
def test_every_line_parses_with_the_scripts_meaning(line: ScriptLine, tmp_path):
    argv = translate(line, tmp_path / "data", tmp_path / "out")
    args = parse_args(_method(line), argv)
    assert args.dataset == (line.option("--dataset") or "cifar10")
    assert args.data_size == (224 if args.dataset == "imagenet12" else 32)
    assert (args.num_client, args.cutlayer, args.noniid_ratio, args.arch) == (
        int(line.option("--num_client")), int(line.option("--cutlayer")), float(line.option("--noniid_ratio")),
        "ResNet18")
    assert args.ressfl_alpha == 0.0 and args.bottleneck_option == "None" and args.loss_threshold == 0.0
    if "--auto_adjust" in line.argv:  # MocoSFL's own rule for the batch, FedAvg frequency and sampling
        clients = args.num_client
        assert args.batch_size == (100 // clients if clients <= 50 else 1)
        assert args.avg_freq == 1000 // (args.batch_size * clients)
        assert args.client_sample_ratio == (1 / (clients // 100) if clients >= 200 else 1.0)
    else:
        assert args.batch_size == int(line.option("--batch_size"))
    if _method(line) == "moco":  # MocoSFL's V2: a two-layer head into 1024 dimensions, symmetric, cosine, v2 views
        assert (args.moco_version, args.mlp, args.K_dim, args.pairloader_option, args.symmetric, args.cos) == (
            "V2", True, 1024, "mocov2", True, True)
    assert args.is_distributed == (line.processes > 1)


def _trains(line: ScriptLine) -> bool:
    return line.option("--dataset") != "imagenet12" and (RUN_ALL or _key(line) in COVERING)


TRAINED = [line for line in LINES if _trains(line)]




@pytest.mark.parametrize("line", TRAINED, ids=[line.label() for line in TRAINED])
def test_the_line_trains_two_steps(line: ScriptLine, full_size_data: Path, tmp_path):
    output_dir = tmp_path / "out"
    argv = translate(line, full_size_data, output_dir)
    if line.processes == 1:
        run(parse_args(_method(line), argv), evaluations=[])
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), "tests/helpers/run_script_line.py", _method(line), *argv]
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    steps = [entry[0] for entry in metrics["train_loss"]]
    losses = [entry[1] for entry in metrics["train_loss"]]
    assert steps == [1, 2] or steps == [2], steps
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert metrics["world_size"] == (1 if line.processes == 1 else 2)
