"""Golden part: the SwAV step loss of the seed fork (github.com/OliviaChen2018/SL-FedSwAV), from its own code.

    python benchmarks/golden/swav_fork.py --peer_dir <checkout of SL-FedSwAV>

The fork's server instance (functions/sflswav_functions.py) gets three clients' smashed data (global and local
crops, unequal batch sizes) and a tiny server model; its `compute_swav` returns the step loss and the gradient of
the global crops (the only rows whose gradient goes back to the clients there). Its accumulated loss is the item
reproduced by `--compat mocosfl`. The fork's queue is switched off (its queue code needs K == K_dim on one process),
so the part compares the per-client codes and losses without a queue. Its Sinkhorn all-reduces, so a one-process
gloo group is started. Written: tests/fixtures/mocosfl/swav_fork.json and .pt (inputs, weights, outputs; a few KB).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import peer

NAME = "swav_fork"
NMB_CROPS = (2, 3)
CROPS_FOR_ASSIGN = (0, 1)
ROWS_PER_CLIENT = (3, 2, 4)
CHANNELS, GLOBAL_SIZE, LOCAL_SIZE = 4, 4, 2
EMBEDDING_DIM, NMB_PROTOTYPES = 6, 5
TEMPERATURE, EPSILON, SINKHORN_ITERATIONS = 0.1, 0.05, 3
SEED = 11


def tiny_server_body() -> nn.Module:
    """A small server part: conv, ReLU, pooling, linear to the embedding (the fork normalises after it)."""
    return nn.Sequential(nn.Conv2d(CHANNELS, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, EMBEDDING_DIM))


def smashed_inputs(generator: torch.Generator) -> list[list[torch.Tensor]]:
    """Per client, its crops in crop order: NMB_CROPS[0] global crops then NMB_CROPS[1] local crops, (rows, C, H, W)."""
    sizes = [GLOBAL_SIZE] * NMB_CROPS[0] + [LOCAL_SIZE] * NMB_CROPS[1]
    return [[torch.randn(rows, CHANNELS, size, size, generator=generator) for size in sizes] for rows in ROWS_PER_CLIENT]


def start_one_process_group() -> None:
    """The fork's Sinkhorn all-reduces even on one process: a gloo group of one."""
    import torch.distributed as dist

    if not dist.is_initialized():
        init_file = Path(tempfile.mkdtemp()) / "store"
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_dir", required=True, help="a checkout of SL-FedSwAV (the seed's SwAV fork)")
    options = parser.parse_args()
    if not (Path(options.peer_dir) / "run_sflswav.py").is_file():
        print(f"{NAME}: skipped, {options.peer_dir} is not an SL-FedSwAV checkout (no run_sflswav.py); run "
              f"python benchmarks/golden/{NAME}.py --peer_dir <SL-FedSwAV checkout>")
        return
    peer.import_mocosfl(options.peer_dir)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from functions.sflswav_functions import create_sflmocoserver_instance  # the fork's module

    generator = torch.Generator().manual_seed(SEED)
    clients = smashed_inputs(generator)
    torch.manual_seed(SEED)
    body = tiny_server_body()
    prototypes = nn.Linear(EMBEDDING_DIM, NMB_PROTOTYPES, bias=False)
    initial_body = {name: value.clone() for name, value in body.state_dict().items()}
    initial_prototypes = prototypes.weight.detach().clone()  # not normalised: the fork normalises first

    fork_args = argparse.Namespace(symmetric=False, batch_size=max(ROWS_PER_CLIENT), num_client=len(ROWS_PER_CLIENT),
                                   K=16, T=0.2, K_dim=EMBEDDING_DIM, crops_for_assign=list(CROPS_FOR_ASSIGN))
    server = create_sflmocoserver_instance(body, prototypes, nn.CrossEntropyLoss(), torch.device("cpu"), fork_args)
    server.queue = None  # the fork's queue path fails on one process unless K == K_dim; compared without it
    start_one_process_group()
    # As the fork's client forward: one tensor per resolution, the crops of that resolution stacked crop-major.
    embedding_list = [[torch.cat(crops[:NMB_CROPS[0]]), torch.cat(crops[NMB_CROPS[0]:])] for crops in clients]
    loss, global_gradient = server.compute_swav(
        embedding_list, crops_for_assign=list(CROPS_FOR_ASSIGN), nmb_crops=list(NMB_CROPS), temperature=TEMPERATURE,
        epsilon=EPSILON, sinkhorn_iterations=SINKHORN_ITERATIONS, world_size=1, pool=range(len(ROWS_PER_CLIENT)),
        use_fp16=False, scaler=None, is_distributed=False)
    server_gradients = {name: parameter.grad.detach().clone() for name, parameter in body.named_parameters()}
    values = {
        "peer_repository": "OliviaChen2018/SL-FedSwAV",
        "nmb_crops": list(NMB_CROPS), "crops_for_assign": list(CROPS_FOR_ASSIGN),
        "rows_per_client": list(ROWS_PER_CLIENT), "temperature": TEMPERATURE, "epsilon": EPSILON,
        "sinkhorn_iterations": SINKHORN_ITERATIONS, "loss": float(loss),
        "layouts": {"global_gradient": "client-major: per client, its global crops' rows crop after crop"},
    }
    tensors = {
        "client_crops": clients,
        "server_body": initial_body, "prototypes": initial_prototypes,
        "global_gradient": global_gradient, "server_gradients": server_gradients,
        "prototypes_gradient": prototypes.weight.grad.detach().clone(),
    }
    peer.write_fixture(NAME, options.peer_dir, values, tensors)
    print(f"{NAME}: loss {float(loss):.6f}, written to {peer.FIXTURE_DIR / NAME}.json/.pt", file=sys.stderr)


if __name__ == "__main__":
    main()
