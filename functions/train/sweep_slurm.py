"""The sweep's Slurm launcher: the runs that are neither finished nor queued go to the cluster as one submission
(a job array when there are several) through submitit; each run folder keeps its job id (slurm_job.json), so the same
sweep command run again recognises queued and running jobs and resubmits only failed or pre-empted runs (which resume
from their checkpoint). submitit and Slurm's commands are needed only here, imported when used."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from functions.core.errors import UserError
from functions.core.files import write_text_atomic
from functions.train.sweep_job import CHECKPOINT_FILE, SweepJobCall
from functions.train.sweep_jobs import (
    CONSOLE_NAME,
    REPO_ROOT,
    Job,
    job_state,
    run_arguments,
    write_job_config,
)

# The job unpickles the sweep's job class (functions.train.sweep_job) wherever sbatch was called from.
PYTHONPATH_SETUP = f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"
SLURM_FOLDER = "slurm"  # submitit's job scripts and logs: OUTPUT_DIR/slurm/<job id>/
RECORD_NAME = "slurm_job.json"
# Slurm's states of a job that will still run (JOB STATE CODES of squeue/sacct); all others have ended.
QUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING"}
# sacct may not list a job for a while after sbatch accepted it: until then an unknown job counts as queued.
UNKNOWN_GRACE_S = 300
# How many times a run is requeued after its time limit (pre-emptions do not count): long trainings come in slices.
MAX_REQUEUES = 20
PARTITION = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
SLURM_TIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d{1,2}))?(?::(?P<c>\d{1,2}))?")
EXTRA_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
# sbatch options the sweep sets from its own options (or submitit from its folder): --slurm_extra must not.
OWNED_SBATCH_OPTIONS = {"partition": "--slurm_partition", "time": "--slurm_time", "nodes": "--nodes_per_run",
                        "gpus-per-node": "--gpus_per_run", "ntasks-per-node": "--nodes_per_run",
                        "array": "--slurm_array_parallelism", "output": "the sweep folder",
                        "error": "the sweep folder", "open-mode": "the sweep folder", "signal": "the sweep",
                        "job-name": "the sweep"}


def parse_slurm_time(text: str) -> int:
    """A Slurm time limit (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, rounded up."""
    match = SLURM_TIME.fullmatch(text.strip())
    if match is None:
        raise UserError(f"--slurm_time {text!r}: write minutes, HH:MM:SS or D-HH:MM:SS (e.g. 90, 12:00:00, 2-00:00:00)")
    days, a, b, c = (int(match[name]) if match[name] else None for name in ("days", "a", "b", "c"))
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # MINUTES
        seconds = a * 60
    if seconds <= 0:
        raise UserError(f"--slurm_time {text!r}: the time limit must be positive")
    return -(-seconds // 60)


def parse_extra(items: Sequence[str]) -> dict[str, Any]:
    """--slurm_extra KEY=VALUE: sbatch options passed on as `#SBATCH --KEY=VALUE` (KEY= alone: `#SBATCH --KEY`)."""
    extra: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.lstrip("-")
        if not sep or not EXTRA_KEY.fullmatch(key) or "\n" in value:
            raise UserError(f"--slurm_extra {item!r}: write an sbatch option as KEY=VALUE, e.g. --slurm_extra "
                            "account=myproject qos=high cpus-per-task=8")
        flag = key.replace("_", "-")
        if flag in OWNED_SBATCH_OPTIONS:
            raise UserError(f"--slurm_extra {key}: the sweep sets --{flag}; use {OWNED_SBATCH_OPTIONS[flag]}")
        extra[flag] = value if value else True
    return extra


@dataclass(frozen=True)
class SlurmOptions:
    """What each run asks of the cluster."""

    partition: str | None
    time_min: int
    gpus_per_run: int
    nodes_per_run: int
    nproc_per_node: int
    array_parallelism: int
    extra: dict[str, Any]

    def executor_parameters(self, name: str) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters: one task per node (torchrun starts the processes of the node)."""
        parameters: dict[str, Any] = {"job_name": name, "time": self.time_min, "nodes": self.nodes_per_run,
                                      "ntasks_per_node": 1, "array_parallelism": self.array_parallelism,
                                      "stderr_to_stdout": True, "additional_parameters": dict(self.extra),
                                      "setup": [PYTHONPATH_SETUP]}
        if self.partition:
            parameters["partition"] = self.partition
        if self.gpus_per_run:
            parameters["gpus_per_node"] = self.gpus_per_run
        return parameters

    def call(self, job: Job, config: Path, python: str) -> SweepJobCall:
        """The callable a job runs for `job`."""
        return SweepJobCall(run_arguments(job, config), str(job.folder), python, self.nodes_per_run,
                            self.nproc_per_node)


def slurm_options(partition: str | None, time_limit: str, gpus_per_run: int, nodes_per_run: int,
                  nproc_per_node: int | None, array_parallelism: int, extra: Sequence[str]) -> SlurmOptions:
    """The launcher's options checked, one line each."""
    if partition is not None and not PARTITION.fullmatch(partition):
        raise UserError(f"--slurm_partition {partition!r}: a partition name (letters, digits, '_', '-', '.'), or "
                        "several joined by commas (gpu,gpu-long)")
    for option, value, least in (("--gpus_per_run", gpus_per_run, 0), ("--nodes_per_run", nodes_per_run, 1),
                                 ("--slurm_array_parallelism", array_parallelism, 1)):
        if value < least:
            raise UserError(f"{option} must be at least {least}, got {value}")
    if nodes_per_run > 1 and nproc_per_node is None:
        raise UserError(f"--nodes_per_run {nodes_per_run} starts torchrun on every node: give --nproc_per_node (its "
                        "processes per node, usually --gpus_per_run)")
    return SlurmOptions(partition, parse_slurm_time(time_limit), gpus_per_run, nodes_per_run, nproc_per_node or 1,
                        array_parallelism, parse_extra(extra))


def require_submitit() -> None:
    """submitit importable, or one line saying how to install it."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("--launcher slurm needs submitit: pip install submitit (see requirements.txt)") from None


def require_slurm() -> None:
    """Slurm's commands on PATH (submitit calls sbatch, srun in the job, sacct for states)."""
    missing = [command for command in ("sbatch", "srun", "sacct") if shutil.which(command) is None]
    if missing:
        raise UserError(f"--launcher slurm: {missing[0]} is not on PATH; run the sweep on a machine of the cluster "
                        "(a login node), or add --dry_run to see what it would submit")


# ------------------------------------------------------------------------------------------- job records
def read_record(job: Job) -> dict[str, Any] | None:
    """The job a run was last submitted as ({"job_id", "submitted"}), None when it never was."""
    try:
        record = json.loads((job.folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("job_id"), str) else None


def write_record(job: Job, job_id: str) -> None:
    """Keep the job id in the run folder: the next sweep command looks it up instead of submitting again."""
    write_text_atomic(job.folder / RECORD_NAME, json.dumps({"job_id": job_id, "submitted": time.time(),
                                                            "state": "SUBMITTED"}) + "\n")


def note_state(job: Job, status: RunStatus) -> None:
    """Keep the job's state as Slurm last reported it beside its id (for a reader of the folder; never trusted)."""
    record = read_record(job)
    if record is not None and status.slurm_state and record.get("state") != status.slurm_state:
        record.update(state=status.slurm_state, checked=time.time())
        write_text_atomic(job.folder / RECORD_NAME, json.dumps(record) + "\n")


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Slurm's state of each job (PENDING, RUNNING, FAILED, ...; UNKNOWN when sacct does not list it)."""
    if not job_ids:
        return {}
    from submitit.slurm.slurm import SlurmInfoWatcher

    command = ["sacct", "-o", "JobID,State,NodeList", "--parsable2"]
    for main_id in dict.fromkeys(job_id.split("_")[0] for job_id in job_ids):
        command += ["-j", main_id]
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        # Without states, a queued job would be submitted twice: better stop.
        raise UserError(f"sacct failed ({error}); the sweep cannot tell which of its jobs still run: try again, or "
                        "use --summarise_only") from None
    info = SlurmInfoWatcher().read_info(output)
    return {job_id: (info.get(job_id, {}).get("State") or "UNKNOWN").split()[0] for job_id in job_ids}


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands: done, queued, running, failed, stopped (a checkpoint to resume) or not started."""

    state: str
    job_id: str | None = None
    slurm_state: str | None = None
    detail: str = ""

    @property
    def active(self) -> bool:
        """Queued or running on the cluster: not to be submitted again."""
        return self.state in ("queued", "running")

    @property
    def to_submit(self) -> bool:
        """Neither finished nor queued or running: the launcher submits it."""
        return self.state != "done" and not self.active

    def describe(self) -> str:
        """One line for --status."""
        job = f"job {self.job_id}" + (f", {self.slurm_state}" if self.slurm_state and not self.active else "")
        parts = [job] if self.job_id else []
        text = self.state + (f" ({'; '.join(parts)})" if parts else "")
        return f"{text}: {self.detail}" if self.detail else text


def last_log_line(job: Job) -> str:
    """The last non-empty line of the run's console.log (what it died of), or ''."""
    try:
        lines = (job.folder / CONSOLE_NAME).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")[:300]


def run_status(job: Job, record: dict[str, Any] | None, slurm_state: str | None, now: float) -> RunStatus:
    """A run's status from its folder and, when it was submitted, its job's Slurm state."""
    if job_state(job) == "done":
        return RunStatus("done", record and record["job_id"])
    if record is not None:
        job_id, state = record["job_id"], slurm_state or "UNKNOWN"
        if state in QUEUED_STATES or (state == "UNKNOWN" and now - float(record.get("submitted", 0)) < UNKNOWN_GRACE_S):
            return RunStatus("queued", job_id, state)
        if state in RUNNING_STATES:
            return RunStatus("running", job_id, state)
        return RunStatus("failed", job_id, state, last_log_line(job))
    if (job.folder / CHECKPOINT_FILE).is_file():
        return RunStatus("stopped", detail="resumes from its checkpoint")
    if (job.folder / CONSOLE_NAME).is_file():
        return RunStatus("failed", detail=last_log_line(job))
    return RunStatus("not started")


def statuses(jobs: Sequence[Job]) -> list[RunStatus]:
    """Every run's status (one sacct call for the runs that were submitted)."""
    records = [read_record(job) for job in jobs]
    states = job_states([record["job_id"] for record in records if record is not None])
    now = time.time()
    return [run_status(job, record, states.get(record["job_id"]) if record else None, now)
            for job, record in zip(jobs, records)]


# ------------------------------------------------------------------------------------------- submitting
def sbatch_script(options: SlurmOptions, output_dir: Path, count: int, python: str, name: str) -> str:
    """The sbatch script submitit writes for `count` runs (a job array when more than one)."""
    from submitit.slurm.slurm import (
        _make_sbatch_string,  # the text SlurmExecutor itself submits
    )

    folder = (output_dir / SLURM_FOLDER / "%j").absolute()
    command = f"{shlex.quote(python)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=count if count > 1 else None,
                               **options.executor_parameters(name))


def submit(options: SlurmOptions, jobs: Sequence[Job], output_dir: Path, python: str, name: str) -> list[str]:
    """Submit the runs (one job array), write their configs first and their job ids after; the job ids."""
    import submitit
    from submitit.core.utils import FailedJobError

    configs = [write_job_config(job) for job in jobs]
    executor = submitit.SlurmExecutor(folder=(output_dir / SLURM_FOLDER / "%j").absolute(),
                                      max_num_timeout=MAX_REQUEUES, python=shlex.quote(python))
    executor.update_parameters(**options.executor_parameters(name))
    try:
        with executor.batch():
            handles = [executor.submit(options.call(job, config, python)) for job, config in zip(jobs, configs)]
    except (FailedJobError, OSError, subprocess.SubprocessError) as error:
        reason = next((line.strip() for line in reversed(str(error).splitlines()) if line.strip()), "no output")
        raise UserError(f"sbatch refused the sweep's jobs ({reason}); check --slurm_partition, --slurm_time and "
                        "--slurm_extra") from None
    ids = [handle.job_id for handle in handles]
    for job, job_id in zip(jobs, ids):
        write_record(job, job_id)
    return ids
