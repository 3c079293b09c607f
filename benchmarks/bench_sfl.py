"""Train-step throughput of split federated SSL: the centralised ceiling, the loop client side and the vectorised one.

    python benchmarks/bench_sfl.py --method moco --clients 10 100 --per_client_batch 1 --cutlayer 1 2 --json out.json

Every setting runs on synthetic tensors already on the device (no data loading, no augmentation), so the
numbers are the cost of the training step alone:

* centralised: the unsplit network (client units, then server units and head) with one optimizer, on the same
  global batch and with the same loss; the ceiling that SFL approaches.
* loop: the SFL step of the training loop with `functions.clients.ClientSide` (a Python loop over clients).
* vmap: the same step with `functions.clients_vmap.VectorisedClientSide` (one pass over the whole pool; its
  `--engine` is grouped convolutions when the client model allows, else torch.vmap).

A step is what `Trainer.train_step` does: clients forward, server loss (MoCo's InfoNCE with queue and momentum
encoders, or SwAV's swapped prediction with Sinkhorn codes), one backward, server step, client steps, momentum
copies. With `--client_only` only the client half is timed (loop and vmap): forward, momentum forward, backward
of a fixed stand-in server gradient, client steps, momentum copies. `images_per_sec` counts samples of the global
batch, `--sampled_clients` x `--per_client_batch`, each with all its views (2 for MoCo, sum(--nmb_crops) of the
SwAV defaults for SwAV). Warm-up steps are excluded; each of `--repeats` timed
runs covers `--steps` steps, and the median is reported. CUDA is timed with CUDA events and its peak memory is
`torch.cuda.max_memory_allocated`; on CPU the time is wall-clock and `peak_mem_mb` is the increase of the
process's peak resident set during that setting (0 when an earlier setting already went higher). CPU records
also carry `cpu_step_ms`, the process CPU time per step: with `--threads 1` it is the step's cost even when other
programs compete for the cores, where wall-clock numbers become noisy.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from configs import parse_args  # noqa: E402
from functions.clients import ClientSide  # noqa: E402
from functions.clients_vmap import ENGINES, VectorisedClientSide  # noqa: E402
from functions.errors import UserError, run_cli  # noqa: E402
from functions.server_method import ServerMethod  # noqa: E402
from models.resnet import build_split_resnet, build_unsplit_resnet, check_cutlayer  # noqa: E402

MODES = ("centralised", "loop", "vmap")
METHODS = ("moco", "swav")
Step = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Setting:
    """One measured configuration."""

    method: str
    mode: str
    device: str
    clients: int
    sampled_clients: int
    per_client_batch: int
    cutlayer: int | None   # None for the centralised step, which has no cut
    amp: bool
    arch: str
    width: int
    engine: str | None     # the vectorised client side's engine (vmap mode only)
    client_only: bool = False


# ------------------------------------------------------------------------------------------------- options
def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", type=str, default="moco", choices=METHODS, help="server-side SSL method")
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100], help="numbers of simulated clients")
    parser.add_argument("--per_client_batch", type=int, default=1, help="samples each sampled client sends per step")
    parser.add_argument("--sampled_clients", type=int, default=None,
                        help="clients in the pool each step (default: min(clients, 100))")
    parser.add_argument("--cutlayer", type=int, nargs="+", default=[1], help="cut layers to measure")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: fp16 autocast with a GradScaler on CUDA, bf16 autocast on CPU")
    parser.add_argument("--modes", type=str, nargs="+", default=None, choices=MODES,
                        help="what to measure (default: all three; loop and vmap with --client_only)")
    parser.add_argument("--client_only", action="store_true",
                        help="time only the client side (forward, momentum forward, backward of a fixed gradient, "
                             "step, momentum copies), without the server")
    parser.add_argument("--engine", type=str, default="auto", choices=ENGINES,
                        help="engine of the vmap mode: grouped convolutions, torch.vmap, or auto (grouped when possible)")
    parser.add_argument("--arch", type=str, default="ResNet18", help="ResNet18, ResNet34 or ResNet50")
    parser.add_argument("--width", type=int, default=64, help="base channel count of the ResNet")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the repetitions")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the data and the pool")
    parser.add_argument("--json", type=str, default=None, help="write the records to this JSON file")
    return parser


def parse_options(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the options (one clear UserError per mistake)."""
    options = build_parser().parse_args(argv)
    positive = {"per_client_batch": options.per_client_batch, "width": options.width, "steps": options.steps,
                "repeats": options.repeats, **{f"clients {n}": n for n in options.clients}}
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")
    if options.warmup < 1:
        raise UserError(f"--warmup must be at least 1 (got {options.warmup}): the first step builds caches and is never timed")
    if options.sampled_clients is not None and options.sampled_clients < 1:
        raise UserError(f"--sampled_clients must be at least 1 (got {options.sampled_clients})")
    if options.sampled_clients is not None and options.sampled_clients > min(options.clients):
        raise UserError(f"--sampled_clients {options.sampled_clients} exceeds --clients {min(options.clients)}; "
                        "sample at most as many clients as there are")
    if options.threads is not None and options.threads < 1:
        raise UserError(f"--threads must be at least 1 (got {options.threads})")
    for cutlayer in options.cutlayer:
        check_cutlayer(options.arch, cutlayer)
    if options.modes is None:
        options.modes = ["loop", "vmap"] if options.client_only else list(MODES)
    if options.client_only and "centralised" in options.modes:
        raise UserError("--client_only times the client side of SFL, which the centralised step has not; "
                        "use --modes loop vmap")
    options.device = resolve_device(options.device)
    return options


def resolve_device(name: str | None) -> torch.device:
    """The torch device for --device (cuda when available and none given)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


# ------------------------------------------------------------------------------------------ building a step
def method_args(method: str, seed: int) -> argparse.Namespace:
    """The method's options at their defaults (those of run_sflmoco.py / run_sflswav.py)."""
    return parse_args(method, ["--seed", str(seed), "--output_dir", "unused"])


def build_method(method: str, args: argparse.Namespace, server: torch.nn.Module, device: torch.device) -> ServerMethod:
    """MocoServer or SwavServer around `server` (the server part, or the whole network for the centralised step)."""
    if method == "moco":
        from functions.sflmoco_functions import MocoServer

        return MocoServer(args, server, device).to(device)
    from functions.sflswav_functions import SwavServer

    return SwavServer(args, server, device).to(device)


def model_options(method: str, args: argparse.Namespace, arch: str, width: int) -> dict[str, Any]:
    """Keyword arguments of the ResNet builders for the method's head."""
    if method == "moco":
        return dict(arch=arch, width=width, head="moco", moco_version=args.moco_version, K_dim=args.K_dim)
    return dict(arch=arch, width=width, head="swav", hidden_mlp=args.hidden_mlp, feat_dim=args.feat_dim,
                nmb_prototypes=args.nmb_prototypes)


def synthetic_crops(method: str, args: argparse.Namespace, rows: int, device: torch.device,
                    seed: int) -> list[torch.Tensor]:
    """Random image crops of the global batch: MoCo's two 32-pixel views, or SwAV's multi-crop sizes."""
    generator = torch.Generator().manual_seed(seed)
    if method == "moco":
        sizes = [32, 32]
    else:
        sizes = [size for count, size in zip(args.nmb_crops, args.size_crops) for _ in range(count)]
    return [torch.randn(rows, 3, size, size, generator=generator).to(device) for size in sizes]


def autocast_for(device: torch.device, amp: bool) -> tuple[Callable[[], ContextManager], torch.amp.GradScaler]:
    """The autocast context factory and the GradScaler of a step (fp16 + scaler on CUDA, bf16 on CPU)."""
    if not amp:
        return contextlib.nullcontext, torch.amp.GradScaler(device.type, enabled=False)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return (lambda: torch.autocast(device.type, dtype=dtype)), torch.amp.GradScaler(device.type,
                                                                                   enabled=dtype == torch.float16)


def centralised_step(method: ServerMethod, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     crops: Sequence[torch.Tensor], autocast: Callable[[], ContextManager]) -> Step:
    """One step of the unsplit network: the method's loss on the raw crops, one backward, one optimizer step."""
    state = {"step": 0}

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            momentum_inputs = [crops[k] for k in method.momentum_crops]
            loss, _ = method.compute_loss([crops[k] for k in method.trainable_crops], momentum_inputs, 0)
        scaler.scale(loss).backward()
        method.before_server_step(state["step"])
        scaler.step(optimizer)
        scaler.update()
        method.after_server_step()
        state["step"] += 1
        return loss.detach()

    return step


def sfl_step(clients: ClientSide | VectorisedClientSide, method: ServerMethod, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, crops: Sequence[torch.Tensor], pool: list[int], rows: list[int],
             autocast: Callable[[], ContextManager]) -> Step:
    """One SFL step exactly as Trainer.train_step does it, for either client side."""
    state = {"step": 0}

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        clients.zero_grad(pool)
        with autocast():
            smashed = clients.forward([crops[k] for k in method.trainable_crops], pool, rows)
            server_inputs = [s.detach().requires_grad_(True) for s in smashed]
            momentum_smashed = (clients.momentum_forward([crops[k] for k in method.momentum_crops], pool, rows)
                                if method.momentum_crops else [])
            loss, _ = method.compute_loss(server_inputs, momentum_smashed, 0)
        scaler.scale(loss).backward()
        clients.backward([s.grad for s in server_inputs])
        method.before_server_step(state["step"])
        scaler.step(optimizer)
        clients.step(pool, scaler)
        scaler.update()
        method.after_server_step()
        if method.client_momentum > 0:
            clients.update_momentum_copies(pool, method.client_momentum)
        state["step"] += 1
        return loss.detach()

    return step


def client_only_step(clients: ClientSide | VectorisedClientSide, method: ServerMethod, scaler: torch.amp.GradScaler,
                     crops: Sequence[torch.Tensor], pool: list[int], rows: list[int],
                     autocast: Callable[[], ContextManager]) -> Step:
    """The client half of an SFL step alone: a fixed server gradient stands in for the server."""
    gradients: list[torch.Tensor] = []

    def step() -> torch.Tensor:
        clients.zero_grad(pool)
        with autocast():
            smashed = clients.forward([crops[k] for k in method.trainable_crops], pool, rows)
            if method.momentum_crops:
                clients.momentum_forward([crops[k] for k in method.momentum_crops], pool, rows)
        if not gradients:
            generator = torch.Generator().manual_seed(0)
            gradients.extend(torch.randn(s.shape, generator=generator).to(s.device, s.dtype) for s in smashed)
        clients.backward(gradients)
        clients.step(pool, scaler)
        scaler.update()
        if method.client_momentum > 0:
            clients.update_momentum_copies(pool, method.client_momentum)
        return torch.stack([s.detach().float().square().mean() for s in smashed]).sum()

    return step


def build_step(setting: Setting, device: torch.device, seed: int) -> tuple[Step, str | None]:
    """The train step of one setting, built from the same initial weights and data in every mode."""
    args = method_args(setting.method, seed)
    options = model_options(setting.method, args, setting.arch, setting.width)
    rows = [setting.per_client_batch] * setting.sampled_clients
    crops = synthetic_crops(setting.method, args, sum(rows), device, seed)
    autocast, scaler = autocast_for(device, setting.amp)
    torch.manual_seed(seed)
    if setting.mode == "centralised":
        method = build_method(setting.method, args, build_unsplit_resnet(**options).to(device), device)
        optimizer = torch.optim.SGD(method.optimized_parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        return centralised_step(method, optimizer, scaler, crops, autocast), None
    split = build_split_resnet(cutlayer=setting.cutlayer, **options)
    method = build_method(setting.method, args, split.server.to(device), device)
    client_options = dict(lr=args.c_lr, momentum=args.momentum, weight_decay=args.weight_decay,
                          keep_momentum_copies=method.client_momentum > 0, device=device)
    clients: ClientSide | VectorisedClientSide
    if setting.mode == "loop":
        clients = ClientSide(split.client, setting.clients, **client_options)
    else:
        clients = VectorisedClientSide(split.client, setting.clients, engine=setting.engine or "auto", **client_options)
    optimizer = torch.optim.SGD(method.optimized_parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(seed + 1)
    pool = sorted(torch.randperm(setting.clients, generator=generator)[: setting.sampled_clients].tolist())
    engine = clients.engine if isinstance(clients, VectorisedClientSide) else None
    if setting.client_only:
        return client_only_step(clients, method, scaler, crops, pool, rows, autocast), engine
    return sfl_step(clients, method, optimizer, scaler, crops, pool, rows, autocast), engine


# --------------------------------------------------------------------------------------------- measuring
def _peak_rss_mb() -> float:
    """Peak resident set of this process so far, in MB (ru_maxrss is KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def timed_seconds(step: Step, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds, process CPU seconds) that `steps` consecutive steps take; seconds from CUDA events on CUDA."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0, float("nan")
    begin, cpu_begin = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return time.perf_counter() - begin, time.process_time() - cpu_begin


def measure(setting: Setting, device: torch.device, *, steps: int, warmup: int, repeats: int,
            seed: int) -> dict[str, Any]:
    """Throughput and peak memory of one setting; the first (warm-up) step's loss is kept as a cross-check."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _peak_rss_mb()
    step, engine = build_step(setting, device, seed)
    first_loss = step()
    for _ in range(warmup - 1):
        step()
    timings = [timed_seconds(step, steps, device) for _ in range(repeats)]
    seconds = [wall for wall, _ in timings]
    median = statistics.median(seconds)
    cpu_median = statistics.median(cpu for _, cpu in timings)
    images = setting.sampled_clients * setting.per_client_batch * steps
    if device.type == "cuda":
        peak_mem_mb, peak_mem_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    else:
        peak_mem_mb, peak_mem_kind = max(0.0, _peak_rss_mb() - rss_before), "cpu_peak_rss_increase"
    return {
        **asdict(setting),
        "engine": engine,
        "images_per_sec": images / median,
        "step_ms": 1000.0 * median / steps,
        "step_ms_all": [1000.0 * s / steps for s in seconds],
        # CPU only: process CPU time per step; unlike wall time it ignores other programs on a busy machine.
        "cpu_step_ms": None if device.type == "cuda" else 1000.0 * cpu_median / steps,
        "peak_mem_mb": peak_mem_mb,
        "peak_mem_kind": peak_mem_kind,
        # The first step's loss (with --client_only: the mean square of the smashed activations), equal across modes.
        "first_loss": float(first_loss),
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def settings_of(options: argparse.Namespace) -> list[Setting]:
    """Every setting to measure: per client count, the centralised step once (it has no cut), then cut x mode."""
    settings = []
    for clients in options.clients:
        sampled = options.sampled_clients if options.sampled_clients is not None else min(clients, 100)
        common = dict(method=options.method, device=str(options.device), clients=clients, sampled_clients=sampled,
                      per_client_batch=options.per_client_batch, amp=options.amp, arch=options.arch,
                      width=options.width, client_only=options.client_only)
        if "centralised" in options.modes:
            settings.append(Setting(mode="centralised", cutlayer=None, engine=None, **common))
        for cutlayer in options.cutlayer:
            settings.extend(Setting(mode=mode, cutlayer=cutlayer, engine=options.engine if mode == "vmap" else None,
                                    **common) for mode in options.modes if mode != "centralised")
    return settings


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the records, with each mode's speed relative to the loop of the same setting."""
    loop_speed = {(r["clients"], r["cutlayer"]): r["images_per_sec"] for r in records if r["mode"] == "loop"}
    best_loop = {clients: max(v for (c, _), v in loop_speed.items() if c == clients) for clients, _ in loop_speed}
    header = (f"{'method':<6} {'mode':<12} {'device':<6} {'clients':>7} {'pool':>5} {'batch':>5} {'cut':>3} "
              f"{'amp':>3} {'img/s':>10} {'ms/step':>9} {'cpu ms':>9} {'peak MB':>9} {'x loop':>7}")
    lines = [header, "-" * len(header)]
    for r in records:
        # The centralised step has no cut: it is compared with the fastest loop of the same client count.
        reference = (best_loop.get(r["clients"]) if r["cutlayer"] is None
                     else loop_speed.get((r["clients"], r["cutlayer"])))
        relative = f"{r['images_per_sec'] / reference:.2f}" if reference else "-"
        cut = "-" if r["cutlayer"] is None else str(r["cutlayer"])
        mode = f"vmap:{r['engine']}" if r["engine"] else r["mode"]
        cpu_ms = "-" if r["cpu_step_ms"] is None else f"{r['cpu_step_ms']:.2f}"
        lines.append(f"{r['method']:<6} {mode:<12} {r['device']:<6} {r['clients']:>7} {r['sampled_clients']:>5} "
                     f"{r['per_client_batch']:>5} {cut:>3} {'yes' if r['amp'] else 'no':>3} "
                     f"{r['images_per_sec']:>10.1f} {r['step_ms']:>9.2f} {cpu_ms:>9} {r['peak_mem_mb']:>9.1f} {relative:>7}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Measure every setting, print the table, write the JSON records; returns the records."""
    options = parse_options(argv)
    json_path = Path(options.json) if options.json else None
    if json_path is not None and not json_path.parent.exists():
        raise UserError(f"--json {options.json}: folder {json_path.parent} does not exist; create it first")
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    records = []
    try:
        for setting in settings_of(options):
            print(f"measuring {setting.method} {setting.mode} clients={setting.clients} cut={setting.cutlayer} ...",
                  file=sys.stderr, flush=True)
            records.append(measure(setting, options.device, steps=options.steps, warmup=options.warmup,
                                   repeats=options.repeats, seed=options.seed))
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger process (tests)
    print(format_table(records))
    if options.client_only:
        print("client side only: forward, momentum forward, backward of a fixed gradient, step, momentum copies")
    if options.device.type == "cpu":
        print("peak MB on CPU: increase of the process's peak resident set during the setting (0 = below an earlier peak)")
    if json_path is not None:
        json_path.write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    run_cli(main)
