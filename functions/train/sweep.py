"""Multi-seed sweeps: presets x variants x seeds, one run each, summarised in one table and one kNN plot per preset.

    python -m functions.train.sweep --presets configs/quickstart.yaml configs/swav_cpu.yaml --seeds 0 1 2 \\
        --set data_dir=../shared/data/cifar10-mini --output_dir outputs/sweep_cpu

Each run is its own process (`python run_sfl<method>.py --config ...`, or a torchrun job with --nproc_per_node) in
OUTPUT_DIR/<preset>[_<variant>]/seed<S>/, from a config file holding the preset with the sweep's values; with
--launcher slurm each run is a Slurm job instead (functions.train.sweep_slurm). Running the same command again
continues a sweep that was stopped or killed: finished runs are kept, a run with a checkpoint resumes from it, the
others start. The results are OUTPUT_DIR/results.md and results.csv (mean and sample standard deviation over seeds
of every final figure), runs.csv (one row per run) and OUTPUT_DIR/<preset>[_<variant>]/knn.png (kNN accuracy
against epoch, one line per seed and their mean).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import io
import json
import math
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functions.core.checkpoint import CHECKPOINT_NAME
from functions.core.errors import UserError, run_cli
from functions.core.files import RunFolderLock, check_output_folder, write_atomic, write_text_atomic
from functions.train.sweep_jobs import (
    CONSOLE_NAME,
    JOB_CONFIG_NAME,
    Job,
    build_jobs,
    check_folder,
    check_run_options,
    check_variants,
    job_command,
    job_state,
    make_folder,
    open_console,
    parse_assignments,
    write_job_config,
)
from functions.train.sweep_slurm import (
    SlurmOptions,
    note_state,
    require_slurm,
    require_submitit,
    sbatch_script,
    slurm_options,
    statuses,
    submit,
)

# Final figures that describe the run rather than measure it.
NOT_FIGURES = {"step", "epoch"}


@dataclass
class JobResult:
    """What a finished (or failed) run left: its final figures and its kNN curve."""

    job: Job
    final: dict[str, Any] = field(default_factory=dict)
    knn_curve: list[tuple[float, float]] = field(default_factory=list)
    error: str | None = None


# ------------------------------------------------------------------------------------------ running them
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
        description="Run presets x variants x seeds (one after another here, or as Slurm jobs) and summarise them "
                    "(mean and standard deviation over seeds; kNN against epoch). Run the same command again to "
                    "continue a sweep.")
    parser.add_argument("--presets", nargs="+", required=True,
                        help="preset files (configs/*.yaml); prefix the method (moco:FILE, swav:FILE) where it is not clear")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of every preset")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="common",
                        help="option values for every run (YAML values: 10, true, [2, 4])")
    parser.add_argument("--vary", nargs="+", default=[], metavar="KEY=[V1,V2]",
                        help="options to vary: every combination is a row of the table")
    parser.add_argument("--output_dir", required=True, help="the sweep's folder (one subfolder per run)")
    parser.add_argument("--nproc_per_node", type=int, default=None,
                        help="run each job under torchrun with this many processes per node (default 1: a plain "
                             "process)")
    parser.add_argument("--summarise_only", action="store_true", help="write the table and plots of what ran")
    parser.add_argument("--status", action="store_true",
                        help="list each run's state (done, running, queued, failed with its log's last line) and exit")
    slurm = parser.add_argument_group("Slurm (--launcher slurm: each run a job, submitted through submitit)")
    slurm.add_argument("--launcher", choices=["local", "slurm"], default="local",
                       help="local: run here one after another; slurm: submit the runs and return")
    slurm.add_argument("--slurm_partition", default=None, help="partition(s) of the jobs (the cluster's default if none)")
    slurm.add_argument("--slurm_time", default="24:00:00",
                       help="time limit of one job (minutes, HH:MM:SS or D-HH:MM:SS); a run that reaches it saves "
                            "and is requeued")
    slurm.add_argument("--gpus_per_run", type=int, default=0, help="GPUs of each node of a run")
    slurm.add_argument("--nodes_per_run", type=int, default=1,
                       help="nodes of a run: one task per node, each starting torchrun with --nproc_per_node processes")
    slurm.add_argument("--slurm_array_parallelism", type=int, default=64, help="runs of the job array at once")
    slurm.add_argument("--slurm_extra", nargs="+", default=[], metavar="KEY=VALUE",
                       help="more sbatch options, e.g. account=myproject qos=high cpus-per-task=8")
    slurm.add_argument("--dry_run", action="store_true", help="print what would be submitted and exit")
    return parser


# Options that only the Slurm launcher reads: given with --launcher local, they are refused rather than ignored.
SLURM_ONLY = ("slurm_partition", "slurm_time", "gpus_per_run", "nodes_per_run", "slurm_array_parallelism",
              "slurm_extra", "dry_run")


def check_launcher_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SlurmOptions | None:
    """The launcher's options checked (one line each); the Slurm ones, or None for the local launcher."""
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise UserError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    if args.launcher == "local":
        given = [name for name in SLURM_ONLY if getattr(args, name) != parser.get_default(name)]
        if given:
            raise UserError(f"--{given[0]} is an option of --launcher slurm; add --launcher slurm or drop it")
        return None
    options = slurm_options(args.slurm_partition, args.slurm_time, args.gpus_per_run, args.nodes_per_run,
                            args.nproc_per_node, args.slurm_array_parallelism, args.slurm_extra)
    require_submitit()
    return options


def print_status(jobs: Sequence[Job]) -> None:
    """One line per run: its state, and for a failed run the last line of its console.log."""
    for job, status in zip(jobs, statuses(jobs)):
        print(f"{job.name}: {status.describe()}", flush=True)


def print_dry_run(options: SlurmOptions, jobs: Sequence[Job], output_dir: Path) -> None:
    """The runs that would be submitted, their commands and the sbatch script."""
    pending = [(job, status) for job, status in zip(jobs, statuses(jobs)) if status.to_submit]
    print(f"would submit {len(pending)} of {len(jobs)} runs" + (" as one job array" if len(pending) > 1 else ""))
    for job, status in pending:
        call = options.call(job, job.folder / JOB_CONFIG_NAME, sys.executable)
        resume = " --resume" if (job.folder / CHECKPOINT_NAME).is_file() else ""
        print(f"  {job.name} ({status.state}): {shlex.join(call.run)}{resume}")
    if pending:
        print(sbatch_script(options, output_dir, len(pending), sys.executable, output_dir.name or "sweep"))


def launch_on_slurm(options: SlurmOptions, jobs: Sequence[Job], output_dir: Path) -> None:
    """Submit every run that is neither finished nor queued or running; say what became of each."""
    require_slurm()
    current = statuses(jobs)
    pending = [index for index, status in enumerate(current) if status.to_submit]
    submitted = dict(zip(pending, submit(options, [jobs[index] for index in pending], output_dir, sys.executable,
                                         output_dir.name or "sweep"))) if pending else {}
    for index, (job, status) in enumerate(zip(jobs, current)):
        if index in submitted:
            resume = ", resumes from its checkpoint" if (job.folder / CHECKPOINT_NAME).is_file() else ""
            outcome = f"submitted as job {submitted[index]}{resume}" + (
                f" (was {status.describe()})" if status.job_id else "")
        elif status.state == "done":
            outcome = "done before, kept"
        else:
            note_state(job, status)
            outcome = f"{status.state} as job {status.job_id}, not submitted again"
        print(f"[{index + 1}/{len(jobs)}] {job.name}: {outcome}", flush=True)
    print(f"sweep: {len(submitted)} runs submitted; run the same command again to resubmit failed runs, add --status "
          "to follow them; the table fills in as they finish", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_output_folder("--output_dir", args.output_dir, "the sweep")
    slurm = check_launcher_options(args, parser)
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds lists a seed twice: {args.seeds}")
    common = parse_assignments(args.common, "--set")
    vary = parse_assignments(args.vary, "--vary")
    check_variants(vary, common)
    # A job runs wherever the cluster starts it: its paths must not depend on this shell's folder.
    output_dir = Path(args.output_dir).absolute() if slurm is not None else Path(args.output_dir)
    jobs = build_jobs(args.presets, args.seeds, common, vary, output_dir)
    for job in jobs:  # every run's options, before the first run starts
        check_run_options(job)
    if args.status:
        print_status(jobs)
        return 0
    for job in jobs:
        check_folder(job)
    if slurm is not None and args.dry_run:
        print_dry_run(slurm, jobs, output_dir)
        return 0
    make_folder(output_dir)
    lock = RunFolderLock(output_dir)
    lock.acquire()
    try:
        for job in jobs:  # again, now that no other sweep writes there
            check_folder(job)
        command = shlex.join(["python", "-m", "functions.train.sweep", *(sys.argv[1:] if argv is None else argv)])
        runner = SweepRunner(args.nproc_per_node or 1)
        if slurm is not None and not args.summarise_only:
            launch_on_slurm(slurm, jobs, output_dir)
        elif not args.summarise_only:
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
    if unfinished and not args.summarise_only and slurm is None:
        print(f"error: {len(unfinished)} runs did not finish ({', '.join(unfinished)}); their console.log says "
              "why; run the same command to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
