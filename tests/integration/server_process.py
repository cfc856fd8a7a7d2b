"""A server started by a test: its own process group, a log file, a readiness wait, stop and kill.

Used by the PostgreSQL and S3 fixtures (tests/integration/postgres_server.py, s3_server.py). The server
runs in a new session (`start_new_session`), so `stop()` and `kill()` reach every process it forks and
nothing else on the machine (other test sessions run their own servers next to ours).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.deepspeed_launch import free_port  # noqa: F401 - re-exported for the server fixtures

START_TIMEOUT_S = 120.0


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str) -> bool:
    """Whether `url` answers 200 now (a readiness probe)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class ServerProcess:
    """One server process. `start(command, ready)` returns once `ready()` is true, raising with the log
    tail when the process exits first or the wait times out."""

    def __init__(self, name: str, log_path: Path):
        self.name = name
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    def start(self, command: list[str], *, ready: Callable[[], bool], env: dict | None = None,
              cwd: Path | None = None, timeout: float = START_TIMEOUT_S, **popen) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                            start_new_session=True, **popen)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} while starting "
                                   f"({' '.join(map(str, command))}):\n{self.log_tail()}")
            if ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {timeout:.0f} s:\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)  # the group of our own child (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Send `sig` to the server's group, SIGKILL whatever is left after `timeout` seconds."""
        if self.process is None:
            return
        self._signal_group(sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=timeout)
        self._signal_group(signal.SIGKILL)  # children that outlived the parent

    def kill(self) -> None:
        """SIGKILL the whole group: a crash, no shutdown."""
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no {self.name} log at {self.log_path})"
