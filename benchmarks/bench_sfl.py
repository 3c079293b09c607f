"""Split federated SSL throughput: train step (centralised, loop, vmap), data path, largest batch that fits.

    python benchmarks/bench_sfl.py --method moco          # 10, 100, 1000 clients x batch 1, cut 1 and 2, the three step modes
    python benchmarks/bench_sfl.py --method swav --clients 10 100 --modes data --data_dir ./data
    python benchmarks/bench_sfl.py --method swav --clients 10 100 --cutlayer 1 2 --find_max_batch      # CUDA only

The step modes run on synthetic tensors already on the device (no data loading, no augmentation), so their
numbers are the cost of the training step alone:

* centralised: the unsplit network (client units, then server units and head) with one optimizer, on the same
  global batch and with the same loss; the ceiling that SFL approaches.
* loop: the SFL step of the training loop with `functions.sfl.clients.loop.ClientSide` (a Python loop over clients).
* vmap: the same step with `functions.sfl.clients.vmap.VectorisedClientSide` (one pass over the whole pool; its
  `--engine` is grouped convolutions when the client model allows, else torch.vmap).

A step is the training loop's own `functions.sfl.step.SplitStep`: clients forward, server loss (MoCo's InfoNCE with
queue and momentum encoders, or SwAV's swapped prediction with Sinkhorn codes), one backward, server step, client
steps, momentum copies. With `--client_only` only the client half is timed (loop and vmap): forward, momentum
forward, backward of a fixed stand-in server gradient, client steps, momentum copies. `images_per_sec` counts
samples of the global batch, `--sampled_clients` x `--per_client_batch`, each with all its views (2 for MoCo,
sum(--nmb_crops) of the SwAV defaults for SwAV). Warm-up steps are excluded; each of `--repeats` timed runs
covers `--steps` steps, and the median is reported with the spread of the runs. The settings of one client count
(the centralised step, every cut and mode) are built and warmed up first, then timed in turns, A B C A B C ..., so
a slow spell of the machine falls on all of them alike. On CPU the benchmark also measures how many cores other
programs kept busy meanwhile (Linux /proc/stat) and flags a setting timed while they used more than a quarter of a
core: BUSY in the table, `busy_machine` in the records. CUDA is timed with CUDA events and its peak memory is
`torch.cuda.max_memory_allocated`; on CPU the time is wall-clock and `peak_mem_mb` is the increase of the
process's peak resident set during that setting (0 when an earlier setting already went higher). CPU records
also carry `cpu_step_ms`, the process CPU time per step: with `--threads 1` it is the step's cost even when other
programs compete for the cores, where wall-clock numbers become noisy.

The `data` mode (only when asked in `--modes`) times the training loaders instead; see benchmarks/bench_data.py.

`--find_max_batch` (CUDA only) searches, for every client count, cut layer and step mode, the largest
`--per_client_batch` whose warm-up and one more step run without CUDA running out of memory: doubling from
`--per_client_batch` up to `--max_batch_limit`, then bisection, everything freed between tries. Its records are
measured at that batch (`global_batch` = pool x batch, `max_batch_search` true; batch 0 when even the start does
not fit).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from bench_data import DATA_MODE, data_records, peak_rss_mb  # noqa: E402
from bench_steps import Setting, Step, build_step, method_args, view_spec_of  # noqa: E402
from bench_table import format_table  # noqa: E402

from benchmarks.bench_loaders import dali_import_error  # noqa: E402
from functions.core.errors import UserError, run_cli  # noqa: E402
from functions.methods.registry import method_names  # noqa: E402
from functions.sfl.clients.vmap import ENGINES  # noqa: E402
from models.split import check_cutlayer  # noqa: E402

MODES = ("centralised", "loop", "vmap")   # the train-step modes, measured by default
LOADERS = ("torch", "dali")


# ------------------------------------------------------------------------------------------------- options
def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", type=str, default="moco", choices=method_names(), help="server-side SSL method")
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000], help="numbers of simulated clients")
    parser.add_argument("--per_client_batch", type=int, default=1,
                        help="samples each sampled client sends per step (--find_max_batch: where the search starts)")
    parser.add_argument("--sampled_clients", type=int, default=None,
                        help="clients in the pool each step (default: min(clients, 100))")
    parser.add_argument("--cutlayer", type=int, nargs="+", default=[1, 2], help="cut layers to measure")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: fp16 autocast with a GradScaler on CUDA, bf16 autocast on CPU")
    parser.add_argument("--modes", type=str, nargs="+", default=None, choices=(*MODES, DATA_MODE),
                        help="what to measure: train steps (centralised, loop, vmap) and the training loader (data) "
                             "(default: the three step modes; loop and vmap with --client_only)")
    parser.add_argument("--client_only", action="store_true",
                        help="time only the client side (forward, momentum forward, backward of a fixed gradient, "
                             "step, momentum copies), without the server")
    parser.add_argument("--method_config", type=str, default=None,
                        help="YAML preset (e.g. configs/swav_seed.yaml) whose method options the step and the loader "
                             "use: crops, prototypes, queue, MoCo head; network, cut, clients and batch still come "
                             "from this command's options")
    parser.add_argument("--cudnn_benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark (the training scripts' --cudnn_benchmark); its "
                             "algorithm search happens in the warm-up steps")
    parser.add_argument("--channels_last", action="store_true",
                        help="NHWC memory layout for clients and server (the training scripts' --channels_last)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the server part (the training scripts' --compile); compilation happens "
                             "in the warm-up steps, which are not timed")
    parser.add_argument("--engine", type=str, default="auto", choices=ENGINES,
                        help="engine of the vmap mode: grouped convolutions, torch.vmap, or auto (grouped when possible)")
    parser.add_argument("--arch", type=str, default="ResNet18", help="split backbone (any --arch of the training scripts)")
    parser.add_argument("--width", type=int, default=64, help="base channel count of the backbone (64 = standard)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the repetitions")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the data and the pool")
    parser.add_argument("--json", type=str, default=None, help="write the records to this JSON file")
    data = parser.add_argument_group("data mode (--modes ... data)")
    data.add_argument("--loaders", type=str, nargs="+", default=None, choices=LOADERS,
                      help="training loaders to time (default: torch and dali; dali is skipped with a note when "
                           "NVIDIA DALI is not installed, unless asked for explicitly)")
    data.add_argument("--data_dir", type=str, default="./data",
                      help="folder holding cifar-10-batches-py/ (synthetic images when absent or too small)")
    data.add_argument("--data_images_per_client", type=int, default=64, help="images each client holds")
    data.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes of the torch loader")
    data.add_argument("--dali_device", type=str, default=None, choices=("cpu", "gpu"),
                      help="where DALI runs its operators (default: gpu on a CUDA --device, else cpu)")
    data.add_argument("--dali_threads", type=int, default=2, help="DALI CPU threads")
    search = parser.add_argument_group("largest batch (CUDA only)")
    search.add_argument("--find_max_batch", action="store_true",
                        help="per client count, cut layer and step mode: search the largest --per_client_batch that "
                             "fits in GPU memory (doubling, then bisection) and measure the step there")
    search.add_argument("--max_batch_limit", type=int, default=4096,
                        help="largest per-client batch the search tries")
    return parser


def parse_options(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the options (one clear UserError per mistake)."""
    options = build_parser().parse_args(argv)
    positive = {"per_client_batch": options.per_client_batch, "width": options.width, "steps": options.steps,
                "repeats": options.repeats, "data_images_per_client": options.data_images_per_client,
                "dali_threads": options.dali_threads, "max_batch_limit": options.max_batch_limit,
                **{f"clients {n}": n for n in options.clients}}
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")
    if options.warmup < 1:
        raise UserError(f"--warmup must be at least 1 (got {options.warmup}): the first step builds caches and is never timed")
    if options.num_workers < 0:
        raise UserError(f"--num_workers must be at least 0 (got {options.num_workers})")
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
    if options.device.type == "cuda":
        if options.device.index is None:
            options.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(options.device)  # CUDA events record on the current device's stream
    if options.find_max_batch:
        if options.device.type != "cuda":
            raise UserError("--find_max_batch needs a CUDA device (it searches for the batch at which GPU memory "
                            "runs out); use --device cuda on a machine with a GPU")
        if not set(options.modes) & set(MODES):
            raise UserError("--find_max_batch searches the step modes; add centralised, loop or vmap to --modes")
        if options.max_batch_limit < options.per_client_batch:
            raise UserError(f"--max_batch_limit {options.max_batch_limit} is below --per_client_batch "
                            f"{options.per_client_batch}, where the search starts; raise it")
    resolve_loaders(options)
    return options


def resolve_loaders(options: argparse.Namespace) -> None:
    """Fill options.loader_names (e.g. torch, dali-cpu) and options.notes for the data mode; DALI is checked here."""
    options.notes = []
    options.loader_names = []
    if options.dali_device is None:
        options.dali_device = "gpu" if options.device.type == "cuda" else "cpu"
    if DATA_MODE not in options.modes:
        return
    explicit = options.loaders is not None
    loaders = list(dict.fromkeys(options.loaders)) if explicit else list(LOADERS)
    if "dali" in loaders:
        missing = dali_import_error()
        if missing is not None and explicit:
            raise UserError(f"--loaders dali needs NVIDIA DALI, which cannot be imported here ({missing}); "
                            "pip install nvidia-dali-cuda120, or leave dali out of --loaders")
        if missing is not None:
            loaders.remove("dali")
            options.notes.append(f"DALI not measured: it cannot be imported here ({missing})")
        elif options.dali_device == "gpu" and not torch.cuda.is_available():
            raise UserError("--dali_device gpu needs a CUDA GPU, and none is available; use --dali_device cpu")
    options.loader_names = [f"dali-{options.dali_device}" if name == "dali" else name for name in loaders]


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


# --------------------------------------------------------------------------------------------- measuring
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


def other_processes_cores(wall_seconds: float, own_cpu_seconds: float, busy_before: float) -> float | None:
    """Average number of cores other processes kept busy since `busy_before` (the machine's busy CPU seconds
    then, from busy_cpu_seconds), given this process's own wall and CPU time since; None where /proc/stat is
    missing."""
    busy_now = busy_cpu_seconds()
    if busy_now is None or wall_seconds <= 0:
        return None
    return max(0.0, (busy_now - busy_before - own_cpu_seconds) / wall_seconds)


def timed_with_others(timer: Callable[[], tuple[float, float]]) -> tuple[float, float, float | None]:
    """timer()'s wall and own CPU seconds, and the cores other programs kept busy meanwhile (None where unknown)."""
    busy_before = busy_cpu_seconds()
    wall, cpu = timer()
    return wall, cpu, None if busy_before is None else other_processes_cores(wall, cpu, busy_before)


def busy_cpu_seconds() -> float | None:
    """CPU seconds every core of the machine spent busy since boot (Linux /proc/stat), None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(value) for value in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle and iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# Other programs using more than this many cores on average during a setting's timing flag it as measured on a
# busy machine: its wall-clock figures (and the ratios between modes) are then not to be trusted.
BUSY_CORES = 0.25


@dataclass
class _Prepared:
    """A built and warmed-up setting waiting for its timed repetitions."""

    setting: Setting
    step: Step
    engine: str | None
    first_loss: float
    peak_mem_mb: float
    seconds: list[float]
    cpu_seconds: list[float]
    other_cores: list[float]


def prepare(setting: Setting, device: torch.device, *, warmup: int, seed: int) -> _Prepared:
    """Build one setting's step and run its warm-up steps (its first loss is kept as a cross-check); the peak memory
    is that of building and warming up (on CUDA: above what was allocated before)."""
    if device.type == "cuda":
        gc.collect()  # what an earlier setting left in reference cycles would otherwise still hold GPU memory
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    rss_before = peak_rss_mb()
    step, engine = build_step(setting, device, seed)
    first_loss = float(step())
    for _ in range(warmup - 1):
        step()
    if device.type == "cuda":
        peak_mem_mb = (torch.cuda.max_memory_allocated(device) - allocated_before) / 2**20
    else:
        peak_mem_mb = max(0.0, peak_rss_mb() - rss_before)
    return _Prepared(setting, step, engine, first_loss, peak_mem_mb, [], [], [])


def time_repetition(prepared: _Prepared, device: torch.device, steps: int) -> None:
    """One timed repetition of `steps` steps, with the load other programs put on the machine meanwhile."""
    def timer() -> tuple[float, float]:
        return timed_seconds(prepared.step, steps, device)

    if device.type == "cpu":
        wall, cpu, other = timed_with_others(timer)
    else:
        (wall, cpu), other = timer(), None
    prepared.seconds.append(wall)
    prepared.cpu_seconds.append(cpu)
    if other is not None:
        prepared.other_cores.append(other)


def record_of(prepared: _Prepared, device: torch.device, *, steps: int, warmup: int) -> dict[str, Any]:
    """The benchmark record of a timed setting: median throughput, the spread of its repetitions, memory."""
    setting, seconds = prepared.setting, prepared.seconds
    median = statistics.median(seconds)
    images = setting.sampled_clients * setting.per_client_batch * steps
    other = max(prepared.other_cores) if prepared.other_cores else None
    return {
        **asdict(setting),
        "engine": prepared.engine,
        "global_batch": setting.sampled_clients * setting.per_client_batch,
        "max_batch_search": False,
        "images_per_sec": images / median,
        "step_ms": 1000.0 * median / steps,
        "step_ms_all": [1000.0 * s / steps for s in seconds],
        # (slowest - fastest) / median of the repetitions, in %.
        "spread_pct": 100.0 * (max(seconds) - min(seconds)) / median,
        # CPU only: process CPU time per step; unlike wall time it ignores other programs on a busy machine.
        "cpu_step_ms": None if device.type == "cuda" else 1000.0 * statistics.median(prepared.cpu_seconds) / steps,
        # CPU only: the most cores other programs kept busy during one repetition, and whether that is too many.
        "other_processes_cores": other,
        "busy_machine": other is not None and other > BUSY_CORES,
        "peak_mem_mb": prepared.peak_mem_mb,
        "peak_mem_kind": ("cuda_max_memory_allocated_above_start" if device.type == "cuda"
                          else "cpu_peak_rss_increase"),
        # The first step's loss (with --client_only: the mean square of the smashed activations), equal across modes.
        "first_loss": prepared.first_loss,
        "steps": steps,
        "warmup": warmup,
        "repeats": len(seconds),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def measure_interleaved(settings: Sequence[Setting], device: torch.device, *, steps: int, warmup: int,
                        repeats: int, seed: int) -> list[dict[str, Any]]:
    """Build and warm up every setting, then time them in turns (A B C A B C ...): a slow spell of the machine
    then falls on every mode alike instead of on whichever ran at that moment."""
    prepared = [prepare(setting, device, warmup=warmup, seed=seed) for setting in settings]
    for _ in range(repeats):
        for entry in prepared:
            time_repetition(entry, device, steps)
    return [record_of(entry, device, steps=steps, warmup=warmup) for entry in prepared]


def measure(setting: Setting, device: torch.device, *, steps: int, warmup: int, repeats: int,
            seed: int) -> dict[str, Any]:
    """Throughput and peak memory of one setting on its own (the largest-batch search)."""
    return measure_interleaved([setting], device, steps=steps, warmup=warmup, repeats=repeats, seed=seed)[0]


def interleaved_groups(settings: Sequence[Setting]) -> list[list[Setting]]:
    """The settings grouped by client count (the centralised step and every cut and mode of it), in order: each
    group is timed in turns."""
    groups: dict[int, list[Setting]] = {}
    for setting in settings:
        groups.setdefault(setting.clients, []).append(setting)
    return list(groups.values())


def settings_of(options: argparse.Namespace) -> list[Setting]:
    """Every setting to measure: per client count, the centralised step once (it has no cut), then cut x mode."""
    settings = []
    for clients in options.clients:
        sampled = options.sampled_clients if options.sampled_clients is not None else min(clients, 100)
        common = dict(method=options.method, device=str(options.device), clients=clients, sampled_clients=sampled,
                      per_client_batch=options.per_client_batch, amp=options.amp, arch=options.arch,
                      width=options.width, client_only=options.client_only, channels_last=options.channels_last,
                      compile=options.compile, method_config=options.method_config)
        if "centralised" in options.modes:
            settings.append(Setting(mode="centralised", cutlayer=None, engine=None, **common))
        for cutlayer in options.cutlayer:
            settings.extend(Setting(mode=mode, cutlayer=cutlayer, engine=options.engine if mode == "vmap" else None,
                                    **common) for mode in options.modes if mode in ("loop", "vmap"))
    return settings


# ------------------------------------------------------------------------------------------- largest batch
def largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest n in [start, limit] with fits(n), for a monotone fits: doubling, then bisection; 0 if start fails."""
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start <= limit, got start {start} and limit {limit}")
    if not fits(start):
        return 0
    fitting, failing = start, None
    while failing is None and fitting < limit:
        candidate = min(2 * fitting, limit)
        if fits(candidate):
            fitting = candidate
        else:
            failing = candidate
    if failing is None:
        return fitting  # the limit itself fits
    while failing - fitting > 1:
        middle = (fitting + failing) // 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return fitting


# Failures of CUDA libraries that also mean "this batch is too large here" (cuBLAS allocations, cuDNN kernels without
# support for the size, 32-bit index limits); any other error stops the search.
TOO_LARGE_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED", "32-bit index",
                     "canUse32BitIndexMath")


def step_fits(build: Callable[[], Step], warmup: int, device: torch.device) -> bool:
    """Whether building a step, its `warmup` warm-up steps and one more step run without CUDA running out of memory."""
    out_of_memory = False
    step: Step | None = None
    try:
        step = build()
        for _ in range(warmup + 1):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True
    except RuntimeError as error:
        if not any(marker in str(error) for marker in TOO_LARGE_MARKERS):
            raise
        print(f"  too large: {str(error).splitlines()[0][:160]}", file=sys.stderr, flush=True)
        out_of_memory = True
    # Outside the except block the error and the frames it held are gone; dropping the step frees the rest.
    step = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return not out_of_memory


def max_batch_record(setting: Setting, device: torch.device, *, limit: int, steps: int, warmup: int, repeats: int,
                     seed: int) -> dict[str, Any]:
    """The record of `setting` at the largest per-client batch in [setting.per_client_batch, limit] that fits."""
    def fits(batch: int) -> bool:
        print(f"  per_client_batch={batch} ...", file=sys.stderr, flush=True)
        return step_fits(lambda: build_step(replace(setting, per_client_batch=batch), device, seed)[0], warmup, device)

    largest = largest_fitting(fits, setting.per_client_batch, limit)
    search = {"max_batch_search": True, "max_batch_limit": limit}
    if largest == 0:
        return {**asdict(replace(setting, per_client_batch=0)), "global_batch": 0, "images_per_sec": None,
                "step_ms": None, "step_ms_all": [], "cpu_step_ms": None, "peak_mem_mb": None, "peak_mem_kind": None,
                "first_loss": None, **search}
    record = measure(replace(setting, per_client_batch=largest), device, steps=steps, warmup=warmup, repeats=repeats,
                     seed=seed)
    return {**record, **search}


# ------------------------------------------------------------------------------------------------- output
def _setting_label(setting: Setting) -> str:
    """mode (and cut) of a setting, for progress lines."""
    return setting.mode if setting.cutlayer is None else f"{setting.mode}@cut{setting.cutlayer}"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Measure every setting, print the table, write the JSON records; returns the records."""
    options = parse_options(argv)
    json_path = Path(options.json) if options.json else None
    if json_path is not None and not json_path.parent.exists():
        raise UserError(f"--json {options.json}: folder {json_path.parent} does not exist; create it first")
    threads, cudnn_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    torch.backends.cudnn.benchmark = options.cudnn_benchmark
    records = []
    try:
        if options.find_max_batch:
            for setting in settings_of(options):
                print(f"searching the largest batch of {setting.method} {setting.mode} clients={setting.clients} "
                      f"cut={setting.cutlayer} ...", file=sys.stderr, flush=True)
                records.append(max_batch_record(setting, options.device, limit=options.max_batch_limit,
                                                steps=options.steps, warmup=options.warmup, repeats=options.repeats,
                                                seed=options.seed))
        else:
            for group in interleaved_groups(settings_of(options)):
                print(f"measuring {group[0].method} clients={group[0].clients}: "
                      f"{', '.join(_setting_label(setting) for setting in group)} in turns ...", file=sys.stderr,
                      flush=True)
                records.extend(measure_interleaved(group, options.device, steps=options.steps,
                                                   warmup=options.warmup, repeats=options.repeats, seed=options.seed))
        if DATA_MODE in options.modes:
            views = view_spec_of(options.method, method_args(options.method, options.seed, options.method_config))
            records.extend(data_records(options, views))
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger process (tests)
        torch.backends.cudnn.benchmark = cudnn_benchmark
    print(format_table(records))
    if options.client_only:
        print("client side only: forward, momentum forward, backward of a fixed gradient, step, momentum copies")
    if options.find_max_batch:
        print(f"max: the largest per-client batch (up to --max_batch_limit {options.max_batch_limit}) whose step fits "
              "in GPU memory, measured there; batch 0 = even --per_client_batch does not fit")
    print("modes of one client count are timed in turns (A B C A B C ...); spread = (slowest - fastest) / median "
          "of the repetitions")
    if options.device.type == "cpu":
        print("peak MB on CPU: increase of the process's peak resident set while the setting was built and warmed up "
              "(0 = below an earlier peak)")
        busy = [r for r in records if r.get("busy_machine")]
        if busy:
            print(f"BUSY: other programs kept up to {max(r['other_processes_cores'] for r in busy):.2f} cores busy "
                  f"while {len(busy)} setting(s) were timed (more than {BUSY_CORES}); their wall-clock figures and "
                  "ratios are not reliable, measure again on an idle machine (cpu ms is the process's own CPU time)")
    for source in dict.fromkeys(r["data_source"] for r in records if r["mode"] == DATA_MODE):
        print(f"data: {source}")
    for note in options.notes:
        print(note)
    if json_path is not None:
        json_path.write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    run_cli(main)
