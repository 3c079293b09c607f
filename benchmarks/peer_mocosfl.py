"""This project's SFL-MoCo step side by side with MocoSFL's own code, at the same settings, timed in turns.

    python benchmarks/peer_mocosfl.py --peer_dir ~/src/MocoSFL                  # 100 clients x 1, 10 clients x 8
    python benchmarks/peer_mocosfl.py --peer_dir ~/src/MocoSFL --settings 100x1 --cutlayer 1 --repeats 7
    python benchmarks/peer_mocosfl.py --peer_dir ~/src/MocoSFL --width 16                       # a narrower ResNet-18

--peer_dir is a checkout of MocoSFL (github.com/SonyResearch/MocoSFL); nothing of it is copied into this project.
Its modules are imported from there in a process of their own (its `functions`, `models` and `configs` packages
share their names with this project's) and patched at run time only as far as running on a CPU needs: `.cuda()`
of tensors and modules returns them unchanged. Both sides train on the same fixed synthetic images (no loader, no
augmentation): what is timed is the step alone, as MocoSFL's run_sflmoco.py runs it (client forwards and momentum
forwards one client after another, the server's symmetric InfoNCE with queue, the clients' backward and SGD steps),
and this project's SplitStep with its loop engine, its vectorised engine and `--client_exec auto`'s choice, plus
the centralised ceiling of benchmarks/bench_sfl.py. Settings are MocoSFL's V2 (MLP head, --K_dim 1024, --K 6000,
--T 0.1, symmetric loss, SGD 0.06 / 0.9 / 5e-4), ResNet-18 at MocoSFL's width 64 or, with --width, another
width: MocoSFL builds its ResNets 64 wide, so for any other width the constructors of its own stem and block
classes are wrapped at run time to scale every channel count by width / 64 (the same layers, groups and order).

Every side runs in its own worker process: built, then --warmup steps, then the parent has each side time --steps
steps in turn (A B C D E A B C D E ...) for --repeats rounds; the median per side is reported (ms per step) with
the spread of the rounds. On a CPU a round timed while other programs kept the machine busy is flagged.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from functions.core.errors import UserError, run_cli  # noqa: E402

SIDES = ("mocosfl", "loop", "vmap", "auto", "centralised")
PEER_FILES = ("run_sflmoco.py", "models/resnet.py", "functions/sflmoco_functions.py", "functions/sfl_functions.py",
              "configs/__init__.py")
MOCO_V2 = {"K": 6000, "K_dim": 1024, "T": 0.1, "lr": 0.06, "momentum": 0.9, "weight_decay": 5e-4}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--peer_dir", type=str, required=True, help="a checkout of MocoSFL (its run_sflmoco.py, models/, functions/)")
    parser.add_argument("--settings", type=str, nargs="+", default=["100x1", "10x8"],
                        help="CLIENTSxBATCH: clients (all in the pool) and images per client per step")
    parser.add_argument("--cutlayer", type=int, default=2, help="cut layer (MocoSFL's numbering = this project's)")
    parser.add_argument("--width", type=int, default=64,
                        help="ResNet-18 width (channels of the first stage); MocoSFL's own is 64, others are scaled")
    parser.add_argument("--sides", type=str, nargs="+", default=list(SIDES), choices=SIDES, help="what to time")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per side (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of every side")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the images")
    parser.add_argument("--json", type=str, default=None, help="write the records to this JSON file")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_setting(text: str) -> tuple[int, int]:
    """(clients, images per client) of a CLIENTSxBATCH setting."""
    try:
        clients, batch = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--settings {text}: write CLIENTSxBATCH, e.g. 100x1") from None
    if clients < 1 or batch < 1:
        raise UserError(f"--settings {text}: clients and batch must be at least 1")
    return clients, batch


# --------------------------------------------------------------------------------------------------- workers
def synthetic_views(clients: int, batch: int, seed: int) -> list[tuple[Any, Any]]:
    """Two 32-pixel views per image, batch images per client, the same on every side."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=generator), torch.randn(batch, 3, 32, 32, generator=generator))
            for _ in range(clients)]


def scale_peer_width(resnet_module: Any, width: int) -> None:
    """Have MocoSFL's resnet module build its GroupNorm stem and blocks `width` wide instead of 64 wide."""
    if width == 64:
        return

    def scaled(channels: int) -> int:
        return channels * width // 64

    # Their constructors are wrapped in place (not subclassed: MocoSFL's super(Class, self) calls look the class
    # names up in the module); make_layers() passes them 64-based channel counts, the image's 3 are kept.
    block_init, stem_init = resnet_module.BasicBlock_gn.__init__, resnet_module.conv3x3_gn.__init__

    def block(self: Any, in_planes: int, planes: int, *args: Any, **kwargs: Any) -> None:
        block_init(self, scaled(in_planes), scaled(planes), *args, **kwargs)

    def stem(self: Any, in_planes: int, planes: int, *args: Any, **kwargs: Any) -> None:
        stem_init(self, in_planes, scaled(planes), *args, **kwargs)

    resnet_module.BasicBlock_gn.__init__, resnet_module.conv3x3_gn.__init__ = block, stem


def peer_step(options: argparse.Namespace) -> Callable[[], None]:
    """MocoSFL's training step, built from its own modules (imported from --peer_dir) on the CPU."""
    import torch
    import torch.nn as nn

    # The only patch: MocoSFL moves tensors and modules with .cuda(); on a CPU that is a no-op.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    # MocoSFL's packages have this project's names (functions, models, configs): forget ours in this process.
    for name in list(sys.modules):
        if name.split(".")[0] in ("functions", "models", "configs"):
            del sys.modules[name]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO_ROOT]
    sys.path.insert(0, str(Path(options.peer_dir).resolve()))
    from functions.sfl_functions import client_backward  # MocoSFL's
    from functions.sflmoco_functions import sflmoco_simulator  # MocoSFL's

    from configs import get_sfl_args  # MocoSFL's
    from models import resnet  # MocoSFL's
    from models.resnet import init_weights  # MocoSFL's

    output_dir = tempfile.mkdtemp(prefix="peer_mocosfl_")
    sys.argv = ["run_sflmoco.py", "--num_client", str(options.clients), "--batch_size", str(options.batch),
                "--cutlayer", str(options.cutlayer), "--moco_version", "V2", "--symmetric", "--mlp", "--cos",
                "--K", str(MOCO_V2["K"]), "--K_dim", str(MOCO_V2["K_dim"]), "--T", str(MOCO_V2["T"]),
                "--lr", str(MOCO_V2["lr"]), "--output_dir", output_dir, "--seed", str(options.seed)]
    args = get_sfl_args()
    scale_peer_width(resnet, options.width)
    torch.manual_seed(options.seed)
    model = resnet.ResNet18(cutting_layer=args.cutlayer, num_client=args.num_client, num_class=args.K_dim,
                            group_norm=True, input_size=32, adds_bottleneck=False, bottleneck_option="None",
                            c_residual=args.c_residual, WS=args.WS)
    # MocoSFL's V2 head, as its run_sflmoco.py builds it for --mlp.
    head = nn.Sequential(nn.Linear(8 * options.width, args.K_dim), nn.ReLU(True), nn.Linear(args.K_dim, args.K_dim))
    head.apply(init_weights)
    model.classifier = head
    model.merge_classifier_cloud()
    views = synthetic_views(args.num_client, args.batch_size, options.seed)
    # Each client's "loader" is its fixed pair of views; the step below hands them over directly.
    simulator = sflmoco_simulator(model, nn.CrossEntropyLoss(), [[view] for view in views], None, args)
    simulator.train()
    pool = list(range(args.num_client))

    def step() -> None:
        simulator.optimizer_zero_grads()
        queries, keys = [], []
        for client in pool:
            query, key = views[client]
            queries.append(simulator.c_instance_list[client](query))
            with torch.no_grad():
                keys.append(simulator.c_instance_list[client].t_model(key).detach())
        simulator.s_optimizer.zero_grad()
        _, gradient, _ = simulator.s_instance.compute(torch.cat(queries), torch.cat(keys), pool=pool)
        simulator.s_optimizer.step()
        rows = args.batch_size
        client_backward(simulator, pool, {j: gradient[j * rows:(j + 1) * rows] for j in range(len(pool))})

    return step


def auto_engine(cutlayer: int, width: int, batch: int) -> str:
    """The engine `--client_exec auto` picks for this setting's client part on the CPU."""
    import torch

    from functions.sfl.clients.engines import auto_client_exec
    from models.split import build_split_model

    return auto_client_exec(build_split_model("ResNet18", cutlayer, width=width).client, torch.device("cpu"), batch)


def own_step(options: argparse.Namespace, side: str) -> Callable[[], None]:
    """This project's step (benchmarks/bench_steps.py's build) on the same images: loop, vmap, auto or centralised."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    sys.path.insert(0, str(REPO_ROOT))
    import bench_steps
    import torch

    mode = auto_engine(options.cutlayer, options.width, options.batch) if side == "auto" else side
    setting = bench_steps.Setting(method="moco", mode=mode, device="cpu", clients=options.clients,
                                  sampled_clients=options.clients, per_client_batch=options.batch,
                                  cutlayer=None if side == "centralised" else options.cutlayer, amp=False,
                                  arch="ResNet18", width=options.width, engine="auto" if mode == "vmap" else None,
                                  method_config=str(REPO_ROOT / "configs" / "mocosfl_table3_100clients.yaml"))
    step, _ = bench_steps.build_step(setting, torch.device("cpu"), options.seed)
    return step


def run_worker(options: argparse.Namespace) -> None:
    """Build one side's step, warm it up, then time `steps` steps each time the parent asks (line protocol)."""
    import torch

    torch.set_num_threads(options.threads)
    step = peer_step(options) if options.worker == "mocosfl" else own_step(options, options.worker)
    for _ in range(options.warmup):
        step()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "time":
            break
        begin, cpu_begin = time.perf_counter(), time.process_time()
        for _ in range(options.steps):
            step()
        print(json.dumps({"seconds": time.perf_counter() - begin, "cpu_seconds": time.process_time() - cpu_begin}),
              flush=True)


# ---------------------------------------------------------------------------------------------------- parent
class Worker:
    """One side's worker process."""

    def __init__(self, side: str, options: argparse.Namespace, clients: int, batch: int) -> None:
        self.side = side
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--peer_dir", options.peer_dir,
                   "--clients", str(clients), "--batch", str(batch), "--cutlayer", str(options.cutlayer),
                   "--width", str(options.width),
                   "--steps", str(options.steps), "--warmup", str(options.warmup), "--threads", str(options.threads),
                   "--seed", str(options.seed)]
        env = {**os.environ, "OMP_NUM_THREADS": str(options.threads)}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                        cwd=tempfile.gettempdir())
        self.seconds: list[float] = []  # wall seconds of each timed round
        self.other_cores: list[float] = []  # cores other programs kept busy during each round, where known

    def wait_ready(self) -> None:
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.process.kill()
            raise UserError(f"the {self.side} side did not start (its error is printed above)")

    def time_round(self) -> None:
        """One round of --steps steps; the worker's own CPU time counts as "own", everything else busy meanwhile is
        other programs."""
        from bench_sfl import timed_with_others

        def timer() -> tuple[float, float]:
            self.process.stdin.write("time\n")
            self.process.stdin.flush()
            answer = json.loads(self.process.stdout.readline())
            return answer["seconds"], answer["cpu_seconds"]

        wall, _, other = timed_with_others(timer)
        self.seconds.append(wall)
        if other is not None:
            self.other_cores.append(other)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def measure_setting(options: argparse.Namespace, clients: int, batch: int) -> list[dict[str, Any]]:
    """Every side of one setting, warmed up one after another, then timed in turns."""
    from bench_sfl import BUSY_CORES

    records = []
    workers: list[Worker] = []
    try:
        for side in options.sides:
            print(f"building {side} ({clients} clients x {batch}) ...", file=sys.stderr, flush=True)
            worker = Worker(side, options, clients, batch)
            worker.wait_ready()  # one at a time: a side warming up would slow another one's timing
            workers.append(worker)
        for _ in range(options.repeats):
            for worker in workers:
                worker.time_round()
        for worker in workers:
            seconds = worker.seconds
            median = statistics.median(seconds)
            busiest = max(worker.other_cores) if worker.other_cores else None
            records.append({"side": worker.side, "clients": clients, "per_client_batch": batch,
                            "cutlayer": options.cutlayer, "width": options.width,
                            "step_ms": 1000 * median / options.steps,
                            "step_ms_all": [1000 * s / options.steps for s in seconds],
                            "spread_pct": 100 * (max(seconds) - min(seconds)) / median,
                            "other_processes_cores": busiest,
                            "busy_machine": busiest is not None and busiest > BUSY_CORES,
                            "steps": options.steps, "repeats": options.repeats, "threads": options.threads})
            if worker.side == "auto":
                records[-1]["engine"] = auto_engine(options.cutlayer, options.width, batch)
        add_speed_over_peer(records)
    finally:
        for worker in workers:
            worker.close()
    return records


def add_speed_over_peer(records: list[dict[str, Any]]) -> None:
    """Each side's speed over MocoSFL's round by round (its round / the side's round timed next to it): the median
    and range of those ratios, which a machine's slow drift between rounds does not move as it moves the medians."""
    peer = [r for r in records if r["side"] == "mocosfl"]
    if not peer:
        return
    for record in records:
        if record["side"] == "mocosfl":
            continue
        ratios = [theirs / ours for theirs, ours in zip(peer[0]["step_ms_all"], record["step_ms_all"])]
        record["speed_over_mocosfl"] = statistics.median(ratios)
        record["speed_over_mocosfl_range"] = [min(ratios), max(ratios)]


def format_table(records: Sequence[dict[str, Any]], sides: Sequence[str]) -> str:
    """ms per step: a row per setting, a column per side (spread in brackets, BUSY when flagged, then the speed over
    MocoSFL's step with its range over the rounds)."""
    lines = ["| setting | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
    for clients, batch in dict.fromkeys((r["clients"], r["per_client_batch"]) for r in records):
        cells = []
        for side in sides:
            found = [r for r in records if (r["clients"], r["per_client_batch"], r["side"]) == (clients, batch, side)]
            if not found:
                cells.append("-")
                continue
            r = found[0]
            cells.append(f"{r['step_ms']:,.0f} ({r['spread_pct']:.0f} %)" + (" BUSY" if r["busy_machine"] else ""))
            if "engine" in r:
                cells[-1] += f", {r['engine']}"
            if "speed_over_mocosfl" in r:
                low, high = r["speed_over_mocosfl_range"]
                cells[-1] += f", {r['speed_over_mocosfl']:.2f}x [{low:.2f}-{high:.2f}]"
        lines.append(f"| {clients} clients x {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    options = build_parser().parse_args(argv)
    if options.worker is not None:
        run_worker(options)
        return []
    peer = Path(options.peer_dir)
    missing = [name for name in PEER_FILES if not (peer / name).is_file()]
    if missing:
        raise UserError(f"--peer_dir {peer} is not a MocoSFL checkout (no {missing[0]}); clone "
                         "https://github.com/SonyResearch/MocoSFL and pass its folder")
    for name in ("steps", "warmup", "repeats", "threads", "width"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    sys.path.insert(0, str(REPO_ROOT))
    records = []
    for text in options.settings:
        clients, batch = parse_setting(text)
        records.extend(measure_setting(options, clients, batch))
    print(f"ms per step (spread of {options.repeats} rounds of {options.steps} steps), ResNet-18 width "
          f"{options.width}, cut {options.cutlayer}, {options.threads} threads, sides timed in turns; speed over "
          "MocoSFL = median of the rounds' ratios [range]:")
    print(format_table(records, options.sides))
    if any(r["busy_machine"] for r in records):
        print("BUSY: other programs loaded the machine during those rounds; measure again on an idle machine")
    if options.json:
        Path(options.json).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    run_cli(main)
