"""Golden part `schedules`: the server and client learning rates MocoSFL's own schedulers give, step by step.

    python benchmarks/golden/schedules.py --peer_dir MOCOSFL_CHECKOUT

MocoSFL's simulator (sflmoco_simulator, on a ResNet-18 4 channels wide) builds its schedulers from its own
get_sfl_args; the script then runs the stepping order of its run_sflmoco.py without data: per epoch, every step of
a communicating epoch (status A) calls client_backward (each pool client's optimizer, then its scheduler), the
server's scheduler steps at the end of the epoch. Recorded: the lr each client trains with at each step and the
server's lr of each epoch ("as_run"), and the clients' lr when their scheduler steps once per epoch like the
server's ("per_epoch", what the schedule means). Settings: V2 (cosine), V1 (MultiStepLR), V2 with half the clients
sampled per epoch, and V2 with upload-only / replay epochs (no client step there).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from typing import Any

import peer

WIDTH = 4  # channels of the stem (64 in MocoSFL); the schedulers do not depend on it

# name: (MocoSFL command-line options, steps per epoch, pool of each MocoSFL epoch or None = all, statuses or None)
SETTINGS: dict[str, tuple[list[str], int, list[list[int]] | None, list[str] | None]] = {
    "v2_cos": (["--moco_version", "V2", "--num_client", "2", "--num_epoch", "4", "--lr", "0.06"], 3, None, None),
    "v1_multistep": (["--moco_version", "V1", "--num_client", "2", "--num_epoch", "5", "--lr", "0.06",
                      "--c_lr", "0.03"], 3, None, None),
    "v1_multistep_10": (["--moco_version", "V1", "--num_client", "1", "--num_epoch", "10", "--lr", "0.06"], 2,
                        None, None),
    "v2_sampled": (["--moco_version", "V2", "--num_client", "4", "--num_epoch", "2", "--lr", "0.06",
                    "--client_sample_ratio", "0.5"], 2, [[0, 1], [1, 3], [0, 2], [1, 2]], None),
    "v2_statuses": (["--moco_version", "V2", "--num_client", "2", "--num_epoch", "6", "--lr", "0.06",
                     "--loss_threshold", "0.1"], 2, None, ["A", "A", "B", "C", "C", "A"]),
}


def build_simulator(options: list[str]) -> tuple[Any, Any]:
    """MocoSFL's args and sflmoco_simulator for these options (a narrow ResNet-18, no data)."""
    import torch
    from torch import nn

    from configs import get_sfl_args  # MocoSFL's
    from functions.sflmoco_functions import sflmoco_simulator  # MocoSFL's
    from models import resnet  # MocoSFL's

    sys.argv = ["run_sflmoco.py", *options, "--output_dir", tempfile.mkdtemp(prefix="golden_schedules_")]
    args = get_sfl_args()
    torch.manual_seed(0)
    model = resnet.ResNet18(cutting_layer=args.cutlayer, num_client=args.num_client, num_class=args.K_dim,
                            group_norm=True, input_size=32, adds_bottleneck=False, bottleneck_option="None",
                            c_residual=args.c_residual, WS=args.WS)
    model.merge_classifier_cloud()
    return args, sflmoco_simulator(model, nn.CrossEntropyLoss(), None, None, args)


def lr_of(optimizer: Any) -> float:
    return float(optimizer.param_groups[0]["lr"])


def as_run(options: list[str], steps: int, pools: list[list[int]] | None, statuses: list[str] | None) -> dict:
    """The lrs in run_sflmoco.py's stepping order: clients' schedulers per client step, the server's per epoch."""
    from functions.sfl_functions import client_backward  # MocoSFL's

    args, simulator = build_simulator(options)
    client_lrs: list[list[float]] = []   # [step][client]: the lr client c would train with at that step
    server_lrs: list[float] = []
    for epoch in range(args.num_epoch):
        pool = pools[epoch] if pools is not None else list(range(args.num_client))
        status = statuses[epoch] if statuses is not None else "A"
        server_lrs.append(lr_of(simulator.s_optimizer))
        for _ in range(steps):
            client_lrs.append([lr_of(optimizer) for optimizer in simulator.c_optimizer_list])
            if status == "A":
                # No smashed data went through the clients, so their backward is empty; the optimizer and the
                # scheduler step as in training.
                client_backward(simulator, pool, {j: None for j in range(len(pool))})
        simulator.s_scheduler.step()
    return {"num_epoch": args.num_epoch, "cos": bool(args.cos), "client_lr": client_lrs, "server_lr": server_lrs,
            "pools": pools, "statuses": statuses, "steps_per_epoch": steps}


def per_epoch(options: list[str]) -> dict:
    """The clients' schedulers stepped once per epoch, as the server's."""
    args, simulator = build_simulator(options)
    client_lrs, server_lrs = [], []
    for _ in range(args.num_epoch):
        client_lrs.append(lr_of(simulator.c_optimizer_list[0]))
        server_lrs.append(lr_of(simulator.s_optimizer))
        simulator.c_scheduler_list[0].step()
        simulator.s_scheduler.step()
    return {"client_lr": client_lrs, "server_lr": server_lrs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_dir", required=True, help="a checkout of MocoSFL")
    options = parser.parse_args()
    peer.import_mocosfl(options.peer_dir)
    # Stepping a scheduler before any optimizer step is what a step without data does; torch warns about it.
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
    from models import resnet  # MocoSFL's

    peer.scale_resnet_width(resnet, WIDTH)
    values = {}
    for name, (arguments, steps, pools, statuses) in SETTINGS.items():
        values[name] = {"options": arguments, "as_run": as_run(arguments, steps, pools, statuses),
                        "per_epoch": per_epoch(arguments)}
    peer.write_fixture("schedules", options.peer_dir, values)


if __name__ == "__main__":
    main()
