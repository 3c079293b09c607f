"""What a Slurm job of a sweep runs on its node(s): one run, as a child process, stopped with a checkpoint by Slurm's
time-limit or pre-emption signal (SIGUSR2 from submitit's `--signal`, or SIGTERM), after which the job is requeued and
the run resumes from its checkpoint.

Only the standard library here (submitit imported where needed): submitit unpickles this class in a fresh process on
every node, which then only waits for its child.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The run's checkpoint (functions.core.checkpoint.CHECKPOINT_NAME, which imports torch: a test keeps them equal).
CHECKPOINT_FILE = "checkpoint_last.pt"
CONSOLE_NAME = "console.log"
# Slurm kills the job this long after its warning signal (submitit's --signal=USR2@90): the run must save before.
STOP_WAIT_S = 80
RENDEZVOUS_PORT_BASE = 20000
RENDEZVOUS_PORTS = 20000


def launcher_command(python: str, nodes: int, nproc_per_node: int, environ: Mapping[str, str],
                     master_addr: str = "") -> list[str]:
    """How one node starts the run: a plain process, torchrun on one node, or torchrun's static rendezvous across
    `nodes` (node rank and job id from Slurm's variables, the first node of the job as the master)."""
    if nodes == 1 and nproc_per_node == 1:
        return [python]
    torchrun = [python, "-m", "torch.distributed.run"]
    if nodes == 1:
        return [*torchrun, "--standalone", f"--nproc_per_node={nproc_per_node}"]
    job_digits = "".join(character for character in environ.get("SLURM_JOB_ID", "0") if character.isdigit()) or "0"
    port = RENDEZVOUS_PORT_BASE + int(job_digits) % RENDEZVOUS_PORTS  # two jobs sharing a node use two ports
    return [*torchrun, f"--nnodes={nodes}", f"--nproc_per_node={nproc_per_node}",
            f"--node_rank={environ.get('SLURM_NODEID', '0')}", f"--master_addr={master_addr}",
            f"--master_port={port}"]


def slurm_job_id(environ: Mapping[str, str]) -> str:
    """The id `scontrol requeue` takes: ARRAY_TASK for a task of a job array, the job id otherwise."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID", "")


@dataclass
class SweepJobCall:
    """One run of a sweep as the callable submitit pickles: `run` is the entry script and its options (without
    --resume, added when the folder holds a checkpoint as the job starts, so a requeued job resumes)."""

    run: list[str]
    folder: str
    python: str = sys.executable
    nodes: int = 1
    nproc_per_node: int = 1
    _child: subprocess.Popen | None = field(default=None, init=False, repr=False, compare=False)
    _stopped_by: int | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_child": None, "_stopped_by": None}

    def command(self, environ: Mapping[str, str], resume: bool) -> list[str]:
        """This node's command line of the run."""
        master = self._master_addr() if self.nodes > 1 else ""
        return [*launcher_command(self.python, self.nodes, self.nproc_per_node, environ, master), *self.run,
                *(["--resume"] if resume else [])]

    @staticmethod
    def _master_addr() -> str:
        from submitit import JobEnvironment

        return JobEnvironment().hostnames[0]

    def __call__(self) -> str:
        """Run to the end; a stop signal saves a checkpoint and requeues the job."""
        folder = Path(self.folder)
        node = os.environ.get("SLURM_NODEID", "0")
        console_path = folder / (CONSOLE_NAME if node == "0" else f"console.node{node}.log")
        command = self.command(os.environ, (folder / CHECKPOINT_FILE).is_file())
        # submitit only logs SIGTERM (pre-emption, scancel); the run must hear it to save its checkpoint.
        previous = signal.signal(signal.SIGTERM, self._forward)
        try:
            with open(console_path, "a", encoding="utf-8") as console:
                console.write(f"$ {shlex.join(command)}\n")
                console.flush()
                self._child = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT)
                code = self._child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        if code == 0:
            return "finished"
        if self._stopped_by is not None and os.environ.get("SLURM_PROCID", "0") == "0":
            self._requeue()
        raise RuntimeError(f"the run exited with code {code}; see {console_path}")

    def _forward(self, signum: int, frame: Any) -> None:
        self._stopped_by = signum
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signum)

    def _requeue(self) -> None:
        """Put the job back in the queue (it resumes from the checkpoint just saved), then end this attempt."""
        job_id = slurm_job_id(os.environ)
        requeued = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60,
                                  check=False)
        if requeued.returncode != 0:  # e.g. cancelled by the user: the next sweep command resubmits it
            raise RuntimeError(f"stopped by signal {self._stopped_by}; scontrol requeue {job_id} failed: "
                               f"{requeued.stderr.strip()}")
        print(f"stopped by signal {self._stopped_by}: checkpoint saved, job {job_id} requeued", flush=True)
        sys.exit(-1)  # as submitit does after its own requeue: the attempt ends, no result is written

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on SIGUSR2 (time limit or pre-emption): the run saves and stops, then submitit requeues
        this same call, which resumes from the checkpoint."""
        from submitit.helpers import DelayedSubmission

        # torchrun passes SIGTERM (not SIGUSR2) on to its workers.
        self._forward(signal.SIGTERM if self.nproc_per_node > 1 or self.nodes > 1 else signal.SIGUSR2, None)
        if self._child is not None:
            try:
                self._child.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                pass  # Slurm kills it; the previous checkpoint, if any, is resumed
        return DelayedSubmission(SweepJobCall(self.run, self.folder, self.python, self.nodes, self.nproc_per_node))
