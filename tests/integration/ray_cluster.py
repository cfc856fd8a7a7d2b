"""A real local Ray cluster for job tests: `ray start --head` on 127.0.0.1 with free ports and token
authentication, a job server at http://127.0.0.1:PORT, `ray stop` after.

Use the `ray_cluster` fixture (see tests/integration/test_ray_jobs.py); it yields a RayCluster whose
`env` holds what a client needs (RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_ADDRESS) and whose `address` is the
job server URL.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayCluster:
    address: str
    """The job server URL."""
    gcs_address: str
    token: str
    env: dict
    """The environment of a client: auth mode, token, address, and the venv first on PATH."""
    temp_dir: Path

    def run(self, *args: str, timeout: float = 600, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, env=env or self.env, cwd=cwd
        )


def start_cluster(num_cpus: int = 2) -> RayCluster:
    bin_dir = str(Path(sys.executable).parent)
    token = secrets.token_hex(16)
    # Unix socket paths are limited to ~107 characters: keep the temp dir short.
    temp_dir = Path(tempfile.mkdtemp(prefix="pvray", dir="/tmp"))
    gcs_port, dashboard_port, client_port = free_port(), free_port(), free_port()
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    env.pop("RAY_ADDRESS", None)
    command = [
        f"{bin_dir}/ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client_port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
        # The agent's HTTP port (jobs go through it) defaults to 52365 for every Ray on the machine:
        # with another Ray running, the agent cannot bind and submissions fail with "No available agent".
        f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    started = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    if started.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
    address = f"http://127.0.0.1:{dashboard_port}"
    _wait_for_job_server(address, token)
    env["RAY_ADDRESS"] = address
    return RayCluster(address=address, gcs_address=f"127.0.0.1:{gcs_port}", token=token, env=env, temp_dir=temp_dir)


def add_node(cluster: RayCluster, *, num_cpus: int = 2, resources: dict | None = None) -> None:
    """A second node joining `cluster` on this machine (`ray start --address`, token auth like the
    head) with its own CPUs and custom resources; `stop_cluster` stops it with the head."""
    import json

    command = [
        str(Path(sys.executable).parent / "ray"), "start", f"--address={cluster.gcs_address}",
        "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--resources={json.dumps(resources or {})}", f"--dashboard-agent-listen-port={free_port()}",
        "--disable-usage-stats",
    ]
    env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
    started = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    if started.returncode != 0:
        raise RuntimeError(f"ray start --address failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")


def _wait_for_job_server(address: str, token: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the Ray job server at {address} did not come up within {timeout} s")


def stop_cluster(cluster: RayCluster) -> None:
    """Kill this cluster's processes only: `ray stop` would end every Ray on the machine."""
    import psutil

    gcs_port = cluster.gcs_address.rsplit(":", 1)[1]
    mine = [
        p for p in psutil.process_iter(["cmdline"])
        if any(str(cluster.temp_dir) in arg or arg.endswith(f":{gcs_port}") for arg in p.info["cmdline"] or [])
    ]
    processes = {q.pid: q for p in mine for q in [p, *_children(p)]}
    for process in processes.values():
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(processes.values()), timeout=30)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def _children(process):
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []
