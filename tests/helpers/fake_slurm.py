"""Stand-ins for Slurm's sbatch, srun, sacct and scontrol, for tests without a cluster.

`install(folder)` writes the commands into folder/bin (put it first on PATH) and returns the state folder (set
FAKE_SLURM_DIR to it). sbatch keeps a copy of each script (submissions/<id>.sh), prints "Submitted batch job <id>"
as Slurm does, and runs the job in a background process of this machine: the tasks of an array one after another,
each with Slurm's variables set. sacct prints the states (PENDING, RUNNING, COMPLETED, FAILED) in the format submitit
parses; `scontrol requeue ID` makes the job run again once its current attempt ends, as Slurm's requeue does. srun
runs its command in place (one task), its output in the --output file, and leaves its process id in
jobs/<id>.pid so a test can signal the job.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("sbatch", "srun", "sacct", "scontrol")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED"}


def install(folder: Path) -> Path:
    """Write the stand-in commands into folder/bin; the state folder they share (FAKE_SLURM_DIR)."""
    bin_folder, state = folder / "bin", folder / "slurm_state"
    (state / "jobs").mkdir(parents=True)
    (state / "submissions").mkdir()
    bin_folder.mkdir()
    for command in COMMANDS:
        path = bin_folder / command
        path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                        f"from fake_slurm import main\nmain({command!r}, sys.argv[1:])\n")
        path.chmod(0o755)
    return state


def state_folder() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


def set_state(task: str, state: str) -> None:
    path = state_folder() / "jobs" / f"{task}.state"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(state)
    temporary.replace(path)


def job_state(task: str) -> str:
    path = state_folder() / "jobs" / f"{task}.state"
    return path.read_text() if path.is_file() else ""


def submissions() -> list[Path]:
    """The scripts sbatch received, in order."""
    return sorted((state_folder() / "submissions").glob("*.sh"), key=lambda path: int(path.stem))


def wait_until_ended(tasks: list[str], timeout_s: float = 120) -> dict[str, str]:
    """Wait until every task reached a final state; their states."""
    deadline = time.monotonic() + timeout_s
    while not all(job_state(task) in FINAL_STATES for task in tasks):
        if time.monotonic() > deadline:
            raise AssertionError({task: job_state(task) for task in tasks})
        time.sleep(0.05)
    return {task: job_state(task) for task in tasks}


def sbatch(arguments: list[str]) -> None:
    script = Path(arguments[-1]).read_text()
    counter = state_folder() / "next_id"
    job_id = int(counter.read_text()) if counter.is_file() else 1
    counter.write_text(str(job_id + 1))
    copy = state_folder() / "submissions" / f"{job_id}.sh"
    copy.write_text(script)
    array = re.search(r"^#SBATCH --array=(\d+)-(\d+)", script, re.MULTILINE)
    tasks = [f"{job_id}_{index}" for index in range(int(array[1]), int(array[2]) + 1)] if array else [str(job_id)]
    for task in tasks:
        set_state(task, "PENDING")
    subprocess.Popen([sys.executable, __file__, "run", str(copy), *tasks], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job_id}")


def run(script: str, tasks: list[str]) -> None:
    """The cluster: each task of the job in turn, again while it was requeued."""
    for number, task in enumerate(tasks):
        main_id, _, index = task.partition("_")
        environment = {**os.environ, "SLURM_JOB_ID": str(int(main_id) * 1000 + number) if index else main_id,
                       "SLURM_JOB_NODELIST": "localhost", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
                       "FAKE_SLURM_TASK": task}
        if index:
            environment.update(SLURM_ARRAY_JOB_ID=main_id, SLURM_ARRAY_TASK_ID=index)
        while True:
            set_state(task, "RUNNING")
            code = subprocess.call(["bash", script], env=environment)
            requeue = state_folder() / "jobs" / f"{task}.requeue"
            if not requeue.is_file():
                break
            requeue.unlink()
            set_state(task, "REQUEUED")
        set_state(task, "COMPLETED" if code == 0 else "FAILED")


def srun(arguments: list[str]) -> None:
    options = {"--output": "", "--error": ""}
    while arguments and arguments[0].startswith("--"):
        flag = arguments.pop(0)
        if flag in options:
            options[flag] = arguments.pop(0)
    task = os.environ["FAKE_SLURM_TASK"]
    main_id, _, index = task.partition("_")
    for stream, flag in ((1, "--output"), (2, "--error" if options["--error"] else "--output")):
        if options[flag]:
            path = Path(options[flag].replace("%A", main_id).replace("%a", index).replace("%j", task)
                        .replace("%t", "0"))
            path.parent.mkdir(parents=True, exist_ok=True)
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), stream)
    (state_folder() / "jobs" / f"{task}.pid").write_text(str(os.getpid()))
    os.execvp(arguments[0], arguments)


def sacct(arguments: list[str]) -> None:
    wanted = [arguments[index + 1] for index, flag in enumerate(arguments) if flag == "-j"]
    print("JobID|State|NodeList")
    for path in sorted((state_folder() / "jobs").glob("*.state")):
        if path.stem.split("_")[0] in wanted:
            print(f"{path.stem}|{path.read_text()}|localhost")


def scontrol(arguments: list[str]) -> None:
    if arguments[:1] != ["requeue"] or job_state(arguments[1]) != "RUNNING":
        sys.exit(f"scontrol {' '.join(arguments)}: not supported here")
    (state_folder() / "jobs" / f"{arguments[1]}.requeue").write_text("")


def main(command: str, arguments: list[str]) -> None:
    with open(state_folder() / "calls.log", "a") as log:
        log.write(f"{command} {' '.join(arguments)}\n")
    {"sbatch": sbatch, "srun": srun, "sacct": sacct, "scontrol": scontrol}[command](arguments)


if __name__ == "__main__" and sys.argv[1:2] == ["run"]:
    run(sys.argv[2], sys.argv[3:])
