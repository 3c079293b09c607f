"""Device processes for the tests, each a separate process that joins over 127.0.0.1: forked from a server process
that imported torch and the device code once (a new device starts in a fraction of a second), or started as a user
starts one (`python -m functions.device`, which imports torch again: seconds of CPU).

The fork server is tests/helpers/forked_commands.py's, one per test process. Killing a forked device
kills that process only, as killing the command would.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from forked_commands import FORKSERVER
from paths import REPO_ROOT

from functions.core.errors import run_cli
from functions.data.datasets import NO_DOWNLOAD_ENV
from functions.device.__main__ import main


def device_argv(port: int, client: int, certs: Path, retry_s: float) -> list[str]:
    """The device command's options for `client` joining 127.0.0.1:`port` with mutual TLS."""
    return ["--server", f"127.0.0.1:{port}", "--client_id", str(client), "--credentials", str(certs),
            "--retry_s", str(retry_s)]


def _forked_device(argv: list[str], log: str) -> None:
    """The forked child: the device command's entry with `argv`, its output in `log`; exits with its code."""
    os.environ[NO_DOWNLOAD_ENV] = "1"
    with open(log, "w") as stream:  # not the fork server's inherited output, which may be another test's capture
        os.dup2(stream.fileno(), sys.stdout.fileno())
        os.dup2(stream.fileno(), sys.stderr.fileno())
    run_cli(lambda: sys.exit(main(argv)))


class DeviceProcess:
    """One device process, forked or started as a command: wait for it, kill it, read its log."""

    def __init__(self, port: int, client: int, certs: Path, log: Path, *, command: bool = False,
                 retry_s: float = 30.0) -> None:
        argv = device_argv(port, client, certs, retry_s)
        self.log = log
        self.forked = None  # a multiprocessing process when forked
        self.started: subprocess.Popen | None = None
        if command:
            env = {**os.environ, NO_DOWNLOAD_ENV: "1", "OMP_NUM_THREADS": "1"}
            with open(log, "w") as stream:
                self.started = subprocess.Popen([sys.executable, "-m", "functions.device", *argv], cwd=REPO_ROOT,
                                                env=env, stdout=subprocess.DEVNULL, stderr=stream)
        else:
            self.forked = FORKSERVER.Process(target=_forked_device, args=(argv, str(log)), daemon=True)
            self.forked.start()

    def running(self) -> bool:
        if self.forked is not None:
            return self.forked.is_alive()
        return self.started.poll() is None

    def wait(self, timeout_s: float) -> int | None:
        """Its exit code (None when it still runs after `timeout_s`)."""
        if self.forked is not None:
            self.forked.join(timeout_s)
            return self.forked.exitcode
        try:
            return self.started.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL, then reap it."""
        if self.running():
            (self.forked or self.started).kill()
        self.wait(10.0)

    def lines(self) -> str:
        """What it logged (for a failing test's message)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""
