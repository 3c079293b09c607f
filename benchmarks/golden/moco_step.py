"""Golden part moco_step: MocoSFL's SFL-MoCo training steps (losses, gradients to the clients, weights, queues).

    python benchmarks/golden/moco_step.py --peer_dir ~/src/MocoSFL

A tiny ResNet-18 (MocoSFL's GroupNorm ResNet with its stem and block constructors wrapped to WIDTH channels),
cut after the stem, 2 clients x 3 images of 32 pixels, K 24 keys of 16 dimensions, 3 steps with FedAvg after each
(--avg_freq 3), for every case of {V1, V2, largeV2} x {shared queue, --disable_feature_sharing} x {plain,
--symmetric}. MocoSFL's simulator is built the way its run_sflmoco.py builds it (get_sfl_args from an argv, its
ResNet18, its heads, sflmoco_simulator) and driven in the order of run_sflmoco.py's loop: each client's forward
(which moves its momentum copy) and momentum-copy forward, the server's compute (which moves its momentum encoder
first) and step, the clients' backward and steps (with their schedulers), FedAvg. Two values are set after
get_sfl_args, which otherwise fixes them by --moco_version: K_dim (16 instead of 128-2048) and symmetric (both
values for every version). The head's input is 8 * WIDTH wide (run_sflmoco.py's 512 at width 64), and V1's linear
head, which MocoSFL's ResNet builds 512 wide, is rebuilt at that width.

Weights and images are not stored: every parameter is drawn from a generator seeded by the seed and the
parameter's MocoSFL name (`seeded_parameter`), every image from a generator seeded by the seed, the step and the
client (`synthetic_views`); the tests call the same two functions. What is stored per step: MocoSFL's loss and
accuracy, the client and server learning rates it used, and summaries (`summary`: sum, norm and two fixed random
projections) of both smashed data, of the gradient sent to the clients, of each client's weights and momentum copy,
of the server's weights and momentum encoder, and of the queue(s) with their pointers. The initial queues (random in
MocoSFL) are stored whole (K x K_dim numbers per case). Each case runs a second time in float64 from the same
weights, images and queues; `sensitivity` holds how far each summary of the float32 run is from it (MocoSFL's own
float32 error, which the tests allow for).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import zlib
from typing import Any

import torch

import peer

SEED = 0
WIDTH = 4
CUTLAYER = 1
NUM_CLIENT = 2
ROWS = 3          # images per client per step
IMAGE_SIZE = 32
K = 24
K_DIM = 16
STEPS = 3
AVG_FREQ = 3      # FedAvg after every step (MocoSFL: batch % (num_batch // avg_freq) == num_batch // avg_freq - 1)
LR = 0.05
T = 0.1
VERSIONS = ("V1", "V2", "largeV2")
SUMMARY_SEED = 12345
NORM_SPREAD = 0.05
LAST_NORM_SCALE = 0.1
# The summaries whose float32 error (distance from the float64 run) is stored as `sensitivity`.
SUMMARISED = ("loss", "smashed_query", "smashed_key", "gradient", "clients", "client_momentum", "server",
              "server_momentum", "queues")


def case_name(version: str, per_client_queues: bool, symmetric: bool) -> str:
    """The fixture key of one case, e.g. largeV2-per_client-symmetric."""
    return f"{version}-{'per_client' if per_client_queues else 'shared'}-{'symmetric' if symmetric else 'plain'}"


def cases() -> list[tuple[str, bool, bool]]:
    """Every (version, per-client queues, symmetric) case of the fixture."""
    return [(version, per_client, symmetric) for version in VERSIONS for per_client in (False, True)
            for symmetric in (False, True)]


def seeded_parameter(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A parameter drawn from (seed, its MocoSFL name): weight matrices and kernels Xavier-uniform (as MocoSFL's
    init_weights), norm scales 1 + N(0, 0.05^2), biases N(0, 0.05^2); the last norm of every residual block (bn2)
    scales by 0.1 + N(0, 0.05^2), so that the blocks start close to their shortcuts, as this project's ResNets do:
    with full-scale blocks 3 steps of this tiny network already amplify float32 rounding to 1e-2 (see sensitivity)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(shape) >= 2:
        receptive = 1
        for size in shape[2:]:
            receptive *= size
        bound = (6.0 / ((shape[0] + shape[1]) * receptive)) ** 0.5
        return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
    centre = 0.0 if not name.endswith("weight") else LAST_NORM_SCALE if name.endswith("bn2.weight") else 1.0
    return torch.randn(shape, generator=generator, dtype=torch.float32) * NORM_SPREAD + centre


def synthetic_views(seed: int, step: int, client: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views (query, key) of `client`'s ROWS images at `step`."""
    generator = torch.Generator().manual_seed(seed * 7919 + step * 101 + client)
    return (torch.randn(ROWS, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator, dtype=torch.float32),
            torch.randn(ROWS, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator, dtype=torch.float32))


def summary(values: torch.Tensor) -> list[float]:
    """Sum, norm and two fixed random projections of a tensor (flattened), in float64."""
    flat = values.detach().double().flatten()
    generator = torch.Generator().manual_seed(SUMMARY_SEED)
    projections = torch.randn(2, flat.numel(), generator=generator, dtype=torch.float64)
    return [flat.sum().item(), flat.norm().item(), *(projections @ flat).tolist()]


def sensitivity(step: dict[str, Any], exact: dict[str, Any]) -> dict[str, float]:
    """How far each summarised value of a step is from the same value of another run (float64): the largest
    difference of any entry of its summaries."""
    def change(ours: Any, theirs: Any) -> float:
        if isinstance(ours, list):
            return max((change(a, b) for a, b in zip(ours, theirs)), default=0.0)
        return abs(float(ours) - float(theirs))

    return {key: change(step[key], exact[key]) for key in SUMMARISED}


def flat_parameters(module: Any) -> torch.Tensor:
    """Every parameter of a module in its own order, concatenated (buffers left out)."""
    return torch.cat([parameter.detach().flatten() for parameter in module.parameters()])


def run_case(version: str, per_client_queues: bool, symmetric: bool, dtype: torch.dtype = torch.float32,
             initial_queues: torch.Tensor | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """MocoSFL's steps for one case: (JSON values, tensors). dtype: of every module and tensor MocoSFL creates
    (float64 for the error estimate); initial_queues: the queues to start from instead of MocoSFL's random ones."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _run_case(version, per_client_queues, symmetric, initial_queues)
    finally:
        torch.set_default_dtype(default_dtype)


def _run_case(version: str, per_client_queues: bool, symmetric: bool,
              initial_queues: torch.Tensor | None) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np
    import torch.nn as nn

    from configs import get_sfl_args, set_deterministic  # MocoSFL's
    from functions.sfl_functions import client_backward  # MocoSFL's
    from functions.sflmoco_functions import sflmoco_simulator  # MocoSFL's
    from models import resnet  # MocoSFL's

    sys.argv = ["run_sflmoco.py", "--arch", "ResNet18", "--num_client", str(NUM_CLIENT), "--batch_size", str(ROWS),
                "--cutlayer", str(CUTLAYER), "--moco_version", version, "--K", str(K), "--T", str(T), "--lr", str(LR),
                "--avg_freq", str(AVG_FREQ), "--seed", str(SEED), "--output_dir", tempfile.mkdtemp(prefix="golden_")]
    sys.argv += ["--disable_feature_sharing"] if per_client_queues else []
    args = get_sfl_args()
    set_deterministic(args.seed)
    args.K_dim, args.symmetric = K_DIM, symmetric  # fixed by --moco_version otherwise
    model = resnet.ResNet18(cutting_layer=args.cutlayer, num_client=args.num_client, num_class=args.K_dim,
                            group_norm=True, input_size=args.data_size, adds_bottleneck=args.adds_bottleneck,
                            bottleneck_option=args.bottleneck_option, c_residual=args.c_residual, WS=args.WS)
    features = 8 * WIDTH * model.expansion  # run_sflmoco.py's output_dim 512, scaled with the width
    if args.mlp:
        if args.moco_version == "largeV2":
            head = [nn.Linear(features, 4096), nn.BatchNorm1d(4096), nn.ReLU(True), nn.Linear(4096, args.K_dim)]
        else:
            head = [nn.Linear(features, args.K_dim * model.expansion), nn.ReLU(True),
                    nn.Linear(args.K_dim * model.expansion, args.K_dim)]
        model.classifier = nn.Sequential(*head)
    else:
        model.classifier = nn.Linear(features, args.K_dim)  # its 512-wide default, at this width
    model.merge_classifier_cloud()
    with torch.no_grad():  # every client part and the server part from seeded_parameter
        for client_part in model.local_list:
            for name, parameter in client_part.named_parameters():
                parameter.copy_(seeded_parameter(SEED, "client." + name, tuple(parameter.shape)))
        for name, parameter in model.cloud.named_parameters():
            parameter.copy_(seeded_parameter(SEED, "server." + name, tuple(parameter.shape)))
    # Lists of [name, shape] in module order: the order of flat_parameters (JSON objects are stored sorted).
    client_keys = [[name, list(p.shape)] for name, p in model.local_list[0].named_parameters()]
    server_keys = [[name, list(p.shape)] for name, p in model.cloud.named_parameters()]
    dtype = torch.get_default_dtype()
    loaders = [[tuple(view.to(dtype) for view in synthetic_views(SEED, step, client)) for step in range(STEPS)]
               for client in range(NUM_CLIENT)]
    sfl = sflmoco_simulator(model, nn.CrossEntropyLoss(), loaders, None, args)
    sfl.cpu()
    sfl.s_instance.cuda()
    server = sfl.s_instance
    queues = server.queue if per_client_queues else [server.queue]
    if initial_queues is not None:
        for queue, initial in zip(queues, initial_queues):
            queue.copy_(initial.T)
    # (clients, K / clients, K_dim) with per-client queues, else (1, K, K_dim)
    initial_queues = torch.stack([queue.T.clone() for queue in queues])
    sfl.train()
    pool = range(args.num_client)
    num_batch = STEPS
    steps = []
    # run_sflmoco.py's loop, one epoch of num_batch steps (status "A": no loss threshold).
    for batch in range(num_batch):
        client_lrs = [sfl.c_optimizer_list[c].param_groups[0]["lr"] for c in pool]
        server_lr = sfl.s_optimizer.param_groups[0]["lr"]
        sfl.optimizer_zero_grads()
        hidden_query_list, hidden_pkey_list = [None] * len(pool), [None] * len(pool)
        for i, client_id in enumerate(pool):
            query, pkey = sfl.next_data_batch(client_id)
            hidden_query_list[i] = sfl.c_instance_list[client_id](query)
            with torch.no_grad():
                hidden_pkey_list[i] = sfl.c_instance_list[client_id].t_model(pkey).detach()
        stack_hidden_query = torch.cat(hidden_query_list, dim=0)
        stack_hidden_pkey = torch.cat(hidden_pkey_list, dim=0)
        sfl.s_optimizer.zero_grad()
        loss, gradient, accu = server.compute(stack_hidden_query, stack_hidden_pkey, pool=pool)
        sfl.s_optimizer.step()
        gradient_dict = {j: gradient[j * args.batch_size:(j + 1) * args.batch_size, :] for j in range(len(pool))}
        client_backward(sfl, pool, gradient_dict)
        averaged = batch == num_batch - 1 or (batch % (num_batch // args.avg_freq) == (num_batch // args.avg_freq) - 1)
        if averaged:
            sfl.fedavg(pool, divergence_aware=args.divergence_aware, divergence_measure=args.divergence_measure)
        queues = server.queue if per_client_queues else [server.queue]
        pointers = server.queue_ptr if per_client_queues else [server.queue_ptr]
        steps.append({
            "loss": float(np.asarray(loss)), "accuracy_percent": float(accu), "fedavg": averaged,
            "client_lr": client_lrs, "server_lr": server_lr,
            "smashed_query": summary(stack_hidden_query), "smashed_key": summary(stack_hidden_pkey),
            "gradient": summary(gradient),
            "clients": [summary(flat_parameters(sfl.c_instance_list[c].model)) for c in pool],
            "client_momentum": [summary(flat_parameters(sfl.c_instance_list[c].t_model)) for c in pool],
            "server": summary(flat_parameters(server.model)),
            "server_momentum": summary(flat_parameters(server.t_model)),
            "queues": [summary(queue.T) for queue in queues],
            "pointers": [int(pointer) for pointer in pointers],
        })
    values = {"client_parameters": client_keys, "server_parameters": server_keys, "steps": steps}
    return values, {"initial_queues": initial_queues}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer_dir", required=True, help="a checkout of MocoSFL (github.com/SonyResearch/MocoSFL)")
    options = parser.parse_args()
    peer.import_mocosfl(options.peer_dir)
    from models import resnet  # MocoSFL's

    peer.scale_resnet_width(resnet, WIDTH)
    torch.set_num_threads(1)
    values: dict[str, Any] = {"settings": {"seed": SEED, "width": WIDTH, "cutlayer": CUTLAYER, "num_client": NUM_CLIENT,
                                           "rows": ROWS, "image_size": IMAGE_SIZE, "K": K, "K_dim": K_DIM,
                                           "steps": STEPS, "avg_freq": AVG_FREQ, "lr": LR, "T": T,
                                           # MocoSFL's defaults; its momentum encoders' 0.99 is fixed in its code
                                           "momentum": 0.9, "weight_decay": 5e-4, "moco_momentum": 0.99}}
    tensors: dict[str, Any] = {}
    for version, per_client, symmetric in cases():
        name = case_name(version, per_client, symmetric)
        values[name], tensors[name] = run_case(version, per_client, symmetric)
        exact, _ = run_case(version, per_client, symmetric, torch.float64, tensors[name]["initial_queues"])
        for step, other in zip(values[name]["steps"], exact["steps"]):
            step["sensitivity"] = sensitivity(step, other)
        print(name, [round(step["loss"], 4) for step in values[name]["steps"]],
              [f"{step['sensitivity']['gradient'] / step['gradient'][1]:.0e}" for step in values[name]["steps"]],
              flush=True)
    peer.write_fixture("moco_step", options.peer_dir, values, tensors)


if __name__ == "__main__":
    main()
