"""Commands the tests start, forked from a fork server that imported torch and the project once, instead of a new
Python that imports them again (seconds of CPU per command).

A forked command behaves as `python ARGV...` would for what the tests look at: its own process (a pid to signal or
kill, an exit code, -N when killed by signal N), its own environment and working folder, its stdout and stderr. It
runs an entry script or a driver script (`python SCRIPT ...`), torchrun (`python -m torch.distributed.run ...`), or
torchrun with its workers forked from it (`python tests/helpers/torchrun_forked.py ...`). What it cannot reproduce is
a fresh interpreter: modules read environment variables at import time in the fork server, so a test about import-time
behaviour (a missing package, an interpreter option) starts a real process instead.

The fork server is a fresh interpreter started once per test process (multiprocessing's "forkserver"), never the test
process itself, which may already run gRPC or torch threads that a fork would copy half-way.
"""
from __future__ import annotations

import multiprocessing
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import traceback
import weakref
from pathlib import Path

from paths import REPO_ROOT
from torch.distributed import run as torchrun

# Imported once in the fork server; every command forked from it has them. torch._dynamo is what a first optimizer
# imports (seconds of CPU), multicropdataset the torch data path and torchvision; the device modules are for
# tests/helpers/device_processes.py, which forks its devices from the same server; this module holds the entry.
PRELOAD = ["torch", "torch._dynamo", "torch.distributed.run", "grpc", "multicropdataset", "run_sflmoco", "run_sflswav",
           "functions.device.__main__", "functions.device.client", "device_processes", "forked_commands"]
START_METHOD = "forkserver"  # for torch.multiprocessing.start_processes: ranks forked from the same server
FORKSERVER = multiprocessing.get_context(START_METHOD)
FORKSERVER.set_forkserver_preload(PRELOAD)
TORCHRUN_FORKED = str(REPO_ROOT / "tests" / "helpers" / "torchrun_forked.py")


def _forked_main(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str, new_session: bool) -> None:
    """The forked child: `python *argv` with `env` in `cwd`, its output in the two files (in a session of its own
    when `new_session`, as Popen's start_new_session); exits with its code."""
    if new_session:
        os.setsid()
    # A fork server's child inherits "forkserver" as its default start method; a new interpreter has the platform's
    # (fork), which DataLoader and torchrun workers use.
    multiprocessing.set_start_method(None, force=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for path, stream in ((stdout, sys.stdout), (stderr, sys.stderr)):
        with open(path, "w") as target:  # not the fork server's inherited output, which may be another test's capture
            os.dup2(target.fileno(), stream.fileno())
    code = 0
    try:
        if argv[:2] == ["-m", "torch.distributed.run"]:
            sys.argv = ["torchrun", *argv[2:]]
            torchrun.main(argv[2:])
        elif argv[0] == TORCHRUN_FORKED:
            sys.argv = list(argv)
            torchrun.main(["--run-path", "--start-method", "fork", *argv[1:]])
        else:
            sys.argv = list(argv)
            sys.path.insert(0, str(Path(argv[0]).resolve().parent))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_request:  # as the interpreter maps sys.exit's argument to an exit code
        if exit_request.code is None or isinstance(exit_request.code, int):
            code = exit_request.code or 0
        else:
            print(exit_request.code, file=sys.stderr)
            code = 1
    except BaseException:  # an uncaught exception: its traceback and exit code 1, as the interpreter does
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkedCommand:
    """A started command with subprocess.Popen's interface for what the tests use: pid, poll, wait, send_signal,
    kill, communicate (text), returncode, args."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | str = REPO_ROOT,
                 new_session: bool = False) -> None:
        self.args = [sys.executable, *argv]
        self._output = Path(tempfile.mkdtemp(prefix="forked_command_"))
        weakref.finalize(self, shutil.rmtree, self._output, True)  # its output files go with it
        self._stdout, self._stderr = self._output / "stdout", self._output / "stderr"
        # Not a daemon: torchrun and DataLoader workers start processes of their own, which daemons may not.
        self._process = FORKSERVER.Process(
            target=_forked_main, args=(list(argv), dict(os.environ if env is None else env), str(cwd),
                                       str(self._stdout), str(self._stderr), new_session), daemon=False)
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, signal_number: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, signal_number)

    def kill(self) -> None:
        self._process.kill()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end (subprocess.TimeoutExpired after `timeout`) and return (stdout, stderr)."""
        self.wait(timeout)
        return self.output()

    def output(self) -> tuple[str, str]:
        """What it wrote so far to stdout and stderr."""
        return tuple(path.read_text(errors="replace") if path.exists() else "" for path in (self._stdout, self._stderr))


def run_forked(argv: list[str], env: dict[str, str] | None = None, cwd: Path | str = REPO_ROOT,
               timeout: float = 240) -> subprocess.CompletedProcess:
    """`python *argv` forked, to its end: subprocess.run's result with text output."""
    command = ForkedCommand(argv, env, cwd)
    try:
        stdout, stderr = command.communicate(timeout)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(30)
    return subprocess.CompletedProcess(command.args, command.returncode, stdout, stderr)
