"""Multi-seed sweeps: presets x variants x seeds, one run each, summarised in one table and one kNN plot per preset.

    python -m functions.train.sweep --presets configs/quickstart.yaml configs/swav_cpu.yaml --seeds 0 1 2 \\
        --set data_dir=../shared/data/cifar10-mini --output_dir outputs/sweep_cpu

Each run is its own process (`python run_sfl<method>.py --config ...`, or a torchrun job with --nproc_per_node) in
OUTPUT_DIR/<preset>[_<variant>]/seed<S>/, from a config file holding the preset with the sweep's values. Running
the same command again continues a sweep that was stopped or killed: finished runs are kept, a run with a
checkpoint resumes from it, the others start. The results are OUTPUT_DIR/results.md and results.csv (mean and
sample standard deviation over seeds of every final figure), runs.csv (one row per run) and
OUTPUT_DIR/<preset>[_<variant>]/knn.png (kNN accuracy against epoch, one line per seed and their mean).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import hashlib
import io
import itertools
import json
import math
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from configs import build_parser as build_run_parser
from configs import check_option_values, load_config_file, parse_args_with_config
from functions.core.checkpoint import CHECKPOINT_NAME
from functions.core.errors import UserError, run_cli
from functions.core.files import RunFolderLock, write_atomic, write_text_atomic
from functions.methods.registry import method_class, method_names

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_CONFIG_NAME = "sweep_config.yaml"
CONSOLE_NAME = "console.log"
# Final figures that describe the run rather than measure it.
NOT_FIGURES = {"step", "epoch"}
# Options the sweep sets itself for every run (or that make no sense across runs): --set and --vary refuse them.
SWEEP_OWNED_OPTIONS = {"seed": "--seeds", "output_dir": "--output_dir", "resume": "rerunning the sweep command",
                       "checkpoint": "a single run", "eval_only": "a single run", "config": "--presets"}
# A folder name part: letters, digits and these; anything else becomes "-".
FOLDER_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")
MAX_GROUP_NAME = 100


@dataclass(frozen=True)
class Job:
    """One run of the sweep: a preset (with a variant of options) and a seed."""

    preset: Path
    method: str
    group: str  # the preset's stem and variant: the results table's row
    options: dict[str, Any]  # the preset's values with the sweep's
    seed: int
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.group} seed {self.seed}"


@dataclass
class JobResult:
    """What a finished (or failed) run left: its final figures and its kNN curve."""

    job: Job
    final: dict[str, Any] = field(default_factory=dict)
    knn_curve: list[tuple[float, float]] = field(default_factory=list)
    error: str | None = None


# ------------------------------------------------------------------------------------------------ the jobs
def parse_value(text: str) -> Any:
    """An option value given as KEY=VALUE, read as YAML (numbers, true/false, [lists]) like a preset's."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignments(items: Sequence[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs of --set / --vary, in order; a key the sweep sets itself, or given twice, is refused."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.lstrip("-")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: write KEY=VALUE, e.g. {flag} num_epoch=10")
        if key in SWEEP_OWNED_OPTIONS:
            raise UserError(f"{flag} {key}: the sweep sets {key} for each run; use {SWEEP_OWNED_OPTIONS[key]}")
        if key in values:
            raise UserError(f"{flag} gives {key} twice; give it once")
        values[key] = parse_value(value)
    return values


def check_variants(vary: dict[str, Any], common: dict[str, Any]) -> None:
    """Each --vary a non-empty list of distinct values, of an option --set does not also fix."""
    for key, values in vary.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"--vary {key}: give a list of values, e.g. --vary {key}=[1,2]")
        repeated = next((value for index, value in enumerate(values) if value in values[:index]), None)
        if repeated is not None or len({json.dumps(value, sort_keys=True) for value in values}) < len(values):
            raise UserError(f"--vary {key} lists {repeated!r} twice: each variant would run (and count) twice; "
                            "list each value once")
        if key in common:
            raise UserError(f"--vary {key} and --set {key} both give {key}; keep one")


def preset_method(path: Path) -> str:
    """The method a preset is written for: the one for which none of its options is the other method's."""
    fitting = []
    for method in method_names():
        parser = build_run_parser(method)
        try:
            values = load_config_file(str(path), parser)
        except UserError:
            continue  # an option this method does not know
        foreign = {action.dest for group in parser._action_groups
                   if group.title and group.title.startswith("options of the seed") for action in group._group_actions}
        if not set(values) & foreign:
            fitting.append(method)
    if not fitting:
        raise UserError(f"preset {path} fits no method (an unknown option, or options of two methods); run it alone "
                        "with its entry script to see which option")
    return fitting[0]


def build_jobs(presets: Sequence[str], seeds: Sequence[int], common: dict[str, Any], vary: dict[str, list[Any]],
               output_dir: Path) -> list[Job]:
    """Every (preset, variant, seed) of the sweep, preset by preset, in the order given."""
    jobs: list[Job] = []
    variants = [dict(zip(vary, values)) for values in itertools.product(*vary.values())] if vary else [{}]
    stems: set[str] = set()
    for spec in presets:
        method, _, name = spec.partition(":") if spec.split(":", 1)[0] in method_names() else ("", "", spec)
        path = Path(name)
        if not path.is_file():
            raise UserError(f"preset {name} not found")
        method = method or preset_method(path)
        if path.stem in stems:
            raise UserError(f"two presets are named {path.stem}; their runs would share a folder")
        stems.add(path.stem)
        parser = build_run_parser(method)
        preset = load_config_file(str(path), parser)
        check_option_values(common, parser, f"--set (preset {path})")
        for variant in variants:
            check_option_values(variant, parser, f"--vary (preset {path})")
            options = {**preset, **common, **variant}
            # A preset written for single runs may name its seed or folder: the sweep sets both.
            options.pop("seed", None)
            options.pop("output_dir", None)
            group = group_name(path.stem, variant)
            for seed in seeds:
                jobs.append(Job(path, method, group, options, seed, output_dir / group / f"seed{seed}"))
    folders: set[Path] = set()
    for job in jobs:
        if job.folder in folders:
            raise UserError(f"two runs of the sweep would share the folder {job.folder}; give presets and variant "
                            "values that differ in letters or digits")
        folders.add(job.folder)
    return jobs


def group_name(stem: str, variant: dict[str, Any]) -> str:
    """The folder name of a preset's variant: only letters, digits, '.', '-' and '_', never hidden, never too long."""
    text = stem + "".join(f"_{key}{_compact(value)}" for key, value in variant.items())
    name = FOLDER_NAME_CHARACTERS.sub("-", text).lstrip(".") or "preset"
    if len(name) > MAX_GROUP_NAME:
        name = f"{name[:MAX_GROUP_NAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def _compact(value: Any) -> str:
    """A value as a short folder-name part."""
    text = "-".join(map(str, value)) if isinstance(value, list) else str(value)
    return FOLDER_NAME_CHARACTERS.sub("-", text)


def job_state(job: Job) -> str:
    """done (final figures saved), resume (a checkpoint, no final figures) or start."""
    metrics = job.folder / "metrics.json"
    if metrics.is_file():
        try:
            if json.loads(metrics.read_text()).get("final"):
                return "done"
        except (OSError, ValueError):
            pass
    return "resume" if (job.folder / CHECKPOINT_NAME).is_file() else "start"


def check_run_options(job: Job) -> None:
    """The run's whole option set parsed and checked as its entry script will (one line naming the run otherwise)."""
    argv = ["--seed", str(job.seed), "--output_dir", str(job.folder)]
    try:
        parse_args_with_config(job.method, build_run_parser(job.method), dict(job.options), argv)
    except UserError as error:
        raise UserError(f"run {job.name}: {error}") from None


def saved_options(job: Job) -> dict[str, Any] | None:
    """The options a run folder was made with (its sweep_config.yaml), None when it has none yet."""
    path = job.folder / JOB_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"{path} is not a sweep config the sweep wrote ({reason}); delete {job.folder} or choose "
                        "another --output_dir") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} is not a sweep config the sweep wrote (no option: value lines); delete {job.folder} "
                        "or choose another --output_dir")
    return values


def check_folder(job: Job) -> None:
    """A run folder made with other options (finished or not) is refused: its figures would be reported as this
    sweep's. The fix is the user's: another --output_dir, or the folder deleted to run it again."""
    saved = saved_options(job)
    if saved is None or saved == job.options:
        return
    key = next(key for key in sorted(set(saved) | set(job.options), key=str) if saved.get(key) != job.options.get(key))
    finished = "a finished run" if job_state(job) == "done" else "a run"
    raise UserError(f"{job.folder} holds {finished} made with other options ({key}: {saved.get(key)!r} there, "
                    f"{job.options.get(key)!r} now); choose another --output_dir, or delete that folder to run it "
                    "again")


def write_job_config(job: Job) -> Path:
    """The job's config file (the preset with the sweep's values); a folder made with other values is refused."""
    check_folder(job)
    make_folder(job.folder)
    path = job.folder / JOB_CONFIG_NAME
    write_text_atomic(path, f"# {job.preset} with the sweep's values (python -m functions.train.sweep)\n"
                      + yaml.safe_dump(job.options, sort_keys=True))
    return path


def make_folder(folder: Path) -> None:
    """mkdir -p, a folder that cannot be made being one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot make the folder {folder} ({error.strerror or error}); choose another "
                        "--output_dir") from None


def job_command(job: Job, config: Path, resume: bool, nproc_per_node: int) -> list[str]:
    """The command line of one run."""
    entry = str(REPO_ROOT / method_class(job.method).entry_script)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
                if nproc_per_node > 1 else [sys.executable])
    return [*launcher, entry, "--config", str(config), "--seed", str(job.seed), "--output_dir", str(job.folder),
            *(["--resume"] if resume else [])]


# ------------------------------------------------------------------------------------------ running them
def open_console(job: Job) -> io.TextIOWrapper:
    """The run's console.log, to append to."""
    try:
        return open(job.folder / CONSOLE_NAME, "a", encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write {job.folder / CONSOLE_NAME} ({error.strerror or error}); choose another "
                        "--output_dir") from None


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the sweep process dies (even by SIGKILL), so it saves and stops."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: a killed sweep leaves its current run going; it still ends and can be resumed


class SweepRunner:
    """Runs the jobs one after another; a signal to the sweep is passed to the run in progress, which saves."""

    def __init__(self, nproc_per_node: int) -> None:
        self.nproc_per_node = nproc_per_node
        self.child: subprocess.Popen | None = None
        self.stopped_by: int | None = None

    def _forward(self, signum: int, frame: Any) -> None:
        self.stopped_by = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self, jobs: Sequence[Job]) -> None:
        """Run every job that is not done; stop (after the run in progress saved) on SIGINT or SIGTERM."""
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for index, job in enumerate(jobs, 1):
                if self.stopped_by is not None:
                    break
                state = job_state(job)
                if state == "done":
                    print(f"[{index}/{len(jobs)}] {job.name}: done before, kept", flush=True)
                    continue
                config = write_job_config(job)
                command = job_command(job, config, state == "resume", self.nproc_per_node)
                print(f"[{index}/{len(jobs)}] {job.name}: {'resuming' if state == 'resume' else 'starting'} "
                      f"(log {job.folder / CONSOLE_NAME})", flush=True)
                started = time.monotonic()
                with open_console(job) as console:
                    console.write(f"$ {shlex.join(command)}\n")
                    console.flush()
                    # Its own session: a Ctrl-C reaches the run once, through the sweep.
                    self.child = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT,
                                                  start_new_session=True, preexec_fn=_die_with_parent)
                    code = self.child.wait()
                    self.child = None
                elapsed = time.monotonic() - started
                if self.stopped_by is not None:
                    break
                outcome = "finished" if code == 0 else f"failed (exit {code}; see {job.folder / CONSOLE_NAME})"
                print(f"[{index}/{len(jobs)}] {job.name}: {outcome} in {elapsed:.0f} s", flush=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------- the results
def collect(job: Job) -> JobResult:
    """A run's final figures and kNN curve from its metrics.json."""
    result = JobResult(job)
    try:
        metrics = json.loads((job.folder / "metrics.json").read_text())
    except (OSError, ValueError):
        result.error = "no metrics.json"
        return result
    result.knn_curve = [(float(epoch), float(accuracy)) for epoch, accuracy in metrics.get("knn_acc", [])]
    final = metrics.get("final") or {}
    if not final:
        result.error = "not finished"
    result.final = {key: value for key, value in final.items() if is_figure(key, value)}
    return result


def is_figure(key: str, value: Any) -> bool:
    """A final figure to average over seeds (accuracies; not the step, epoch or best-epoch indices)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_FIGURES
            and not key.endswith("_best_epoch"))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


def summarise(results: Sequence[JobResult]) -> tuple[list[str], list[dict[str, Any]]]:
    """The figure names (in first-seen order) and one row per group: runs, seeds and each figure's mean and std."""
    figures: list[str] = []
    for result in results:
        figures += [key for key in result.final if key not in figures]
    rows: list[dict[str, Any]] = []
    groups = list(dict.fromkeys(result.job.group for result in results))
    for group in groups:
        members = [result for result in results if result.job.group == group]
        finished = [result for result in members if result.error is None]
        row: dict[str, Any] = {"preset": group, "method": members[0].job.method,
                               "seeds": " ".join(str(result.job.seed) for result in finished),
                               "runs": f"{len(finished)}/{len(members)}"}
        for figure in figures:
            values = [float(result.final[figure]) for result in finished if figure in result.final]
            row[f"{figure}_mean"], row[f"{figure}_std"] = mean_std(values) if values else (math.nan, math.nan)
        rows.append(row)
    return figures, rows


def _cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def write_results(output_dir: Path, results: Sequence[JobResult], command: str) -> None:
    """results.md, results.csv, runs.csv and one knn.png per group."""
    figures, rows = summarise(results)
    write_text_atomic(output_dir / "results.csv", csv_text(
        ["preset", "method", "runs", "seeds", *(f"{f}_{s}" for f in figures for s in ("mean", "std"))], rows))
    write_text_atomic(output_dir / "runs.csv", csv_text(
        ["preset", "method", "seed", "status", *figures, "folder"],
        [{"preset": result.job.group, "method": result.job.method, "seed": result.job.seed,
          "status": result.error or "finished", **result.final, "folder": str(result.job.folder)}
         for result in results]))
    lines = ["# Sweep results", "", f"`{command}`", "",
             "Mean ± sample standard deviation over the finished seeds. Figures named `_test_selected` come from "
             "`--eval_protocol mocosfl` (best test epoch, MocoSFL's protocol); the others never looked at the test "
             "set before their last epoch.", "",
             _markdown_row(["preset", "method", "runs", *figures]), _markdown_row(["---"] * (3 + len(figures)))]
    for row in rows:
        lines.append(_markdown_row([row["preset"], row["method"], row["runs"],
                                    *(_cell(row[f"{figure}_mean"], row[f"{figure}_std"]) for figure in figures)]))
    write_text_atomic(output_dir / "results.md", "\n".join(lines) + "\n")
    for group in dict.fromkeys(result.job.group for result in results):
        plot_knn(output_dir / group / "knn.png", group, [result for result in results if result.job.group == group])


def csv_text(fieldnames: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """A CSV file's text: a header and the rows."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_knn(path: Path, title: str, results: Sequence[JobResult]) -> None:
    """kNN accuracy against epoch: one line per seed and, where every seed has the epoch, their mean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    curves = [result for result in results if result.knn_curve]
    for result in curves:
        epochs, accuracies = zip(*result.knn_curve)
        axes.plot(epochs, accuracies, marker=".", linewidth=1, alpha=0.6, label=f"seed {result.job.seed}")
    shared = sorted(set.intersection(*(set(epoch for epoch, _ in result.knn_curve) for result in curves))
                    if curves else set())
    if len(curves) > 1 and shared:
        means = [sum(dict(result.knn_curve)[epoch] for result in curves) / len(curves) for epoch in shared]
        axes.plot(shared, means, color="black", linewidth=2, label="mean")
    axes.set_xlabel("epoch (0 = before training)")
    axes.set_ylabel("kNN accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize=8)
    make_folder(path.parent)
    write_atomic(path, lambda stream: figure.savefig(stream, format="png", dpi=100, bbox_inches="tight"))


# ------------------------------------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m functions.train.sweep", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run presets x variants x seeds one after another and summarise them (mean and standard "
                    "deviation over seeds; kNN against epoch). Run the same command again to continue a sweep.")
    parser.add_argument("--presets", nargs="+", required=True,
                        help="preset files (configs/*.yaml); prefix the method (moco:FILE, swav:FILE) where it is not clear")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of every preset")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="common",
                        help="option values for every run (YAML values: 10, true, [2, 4])")
    parser.add_argument("--vary", nargs="+", default=[], metavar="KEY=[V1,V2]",
                        help="options to vary: every combination is a row of the table")
    parser.add_argument("--output_dir", required=True, help="the sweep's folder (one subfolder per run)")
    parser.add_argument("--nproc_per_node", type=int, default=1,
                        help="run each job under torchrun with this many processes (1 = a plain process)")
    parser.add_argument("--summarise_only", action="store_true", help="write the table and plots of what ran")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc_per_node < 1:
        raise UserError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds lists a seed twice: {args.seeds}")
    common = parse_assignments(args.common, "--set")
    vary = parse_assignments(args.vary, "--vary")
    check_variants(vary, common)
    output_dir = Path(args.output_dir)
    jobs = build_jobs(args.presets, args.seeds, common, vary, output_dir)
    for job in jobs:  # every run's options, before the first run starts
        check_run_options(job)
    make_folder(output_dir)
    lock = RunFolderLock(output_dir)
    lock.acquire()
    try:
        for job in jobs:
            check_folder(job)
        command = shlex.join(["python", "-m", "functions.train.sweep", *(sys.argv[1:] if argv is None else argv)])
        runner = SweepRunner(args.nproc_per_node)
        if not args.summarise_only:
            print(f"sweep: {len(jobs)} runs in {output_dir}", flush=True)
            runner.run(jobs)
        results = [collect(job) for job in jobs]
        write_results(output_dir, results, command)
    finally:
        lock.release()
    print((output_dir / "results.md").read_text(), flush=True)
    if runner.stopped_by is not None:
        print(f"sweep stopped by signal {runner.stopped_by}; run the same command to continue", file=sys.stderr)
        return 128 + runner.stopped_by
    unfinished = [result.job.name for result in results if result.error is not None]
    if unfinished and not args.summarise_only:
        print(f"error: {len(unfinished)} runs did not finish ({', '.join(unfinished)}); their console.log says "
              "why; run the same command to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
