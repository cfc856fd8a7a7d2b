"""A real `mlflow server` for tests: SQLite backend, artifacts proxied into a temp folder, 127.0.0.1 on a
free port. Fixtures in tests/integration/conftest.py:

- `mlflow_server` (session): the URI of one shared server; give each test its own experiment name.
- `mlflow_server_factory`: start a private MlflowServer (for tests that kill or restart it); every
  server it started is stopped after the test.

Both start from a copy of one migrated empty database made once per session (`mlflow_db_template`):
creating MLflow's schema takes ~15 s on a busy CI machine, a server on an existing one starts faster.

The server runs in its own process group (it forks a uvicorn worker), so `kill()` (SIGKILL, a crash)
and `stop()` reach the worker too. MLflow's job runner is switched off: tests do not use it and it
costs a dozen processes and seconds of start-up.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 180.0


def make_template_db(path: Path) -> Path:
    """Create an empty MLflow SQLite database at `path` (runs MLflow's schema migrations once)."""
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MlflowServer:
    root: Path
    """Folder holding the database (mlflow.db), artifacts/ and server.log."""
    template_db: Path | None = None
    """An already-migrated, empty MLflow database copied in as the store (skips ~15 s of migrations)."""
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def start(self, timeout: float = START_TIMEOUT_S) -> MlflowServer:
        """Start the server (again, on the same port and store) and wait until /health answers."""
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        db = self.root / "mlflow.db"
        if self.template_db is not None and not db.exists():
            shutil.copyfile(self.template_db, db)
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        command = [
            str(mlflow_bin),
            "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing after we return
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(
            f"mlflow server did not answer {self.uri}/health within {timeout:.0f} s:\n{self.log_tail()}"
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)  # the group of our own child, started with start_new_session
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server and its worker: a crash, no shutdown. Waits until the port is closed."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._wait_port_closed()

    def stop(self) -> None:
        """Graceful stop (SIGTERM), SIGKILL after 15 s."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=15)
        # The worker may outlive the parent by a moment: make sure the whole group is gone.
        self._signal_group(signal.SIGKILL)
        self._wait_port_closed()

    def _wait_port_closed(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.healthy():
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"
