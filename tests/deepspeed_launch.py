"""Helpers for tests that train through the real `deepspeed` launcher with CPU processes (gloo).

`launch(script_args, num_gpus=2)` runs `deepspeed --num_gpus N --master_port FREE jobs/train.py ...`
(DS_ACCELERATOR=cpu: DeepSpeed's CPU accelerator, gloo); `train_in_process_cli(args)` runs
`python -m pipeline.cli train ...` for one process. `write_latents(root)` writes a small latent data
set with the real shard writer (random latents, one bucket). `read_steps(run)` reads the per-step
records the trainer appends to <output_dir>/steps.jsonl (the last record of each step wins: a resumed
run logs the steps after its checkpoint again).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LATENT_SHAPE = (4, 4, 4, 4)  # (C, T, H, W): 4 token-frames of 2 x 2 tokens with patch 2
TEXT_DIM = 8
BUCKET = "13x32x32"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_env(**extra: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def launch(args: list[str], *, num_gpus: int = 2, env: dict | None = None, timeout: float = 420,
           script: str = "jobs/train.py") -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N` on a free port with CPU processes; returns the finished process."""
    command = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(num_gpus), "--master_port", str(free_port()),
               script, *args]
    return subprocess.run(command, cwd=ROOT, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)


def start_launch(args: list[str], *, num_gpus: int = 2, env: dict | None = None, log: Path) -> subprocess.Popen:
    """Like `launch`, but returns the running launcher (its output goes to `log`)."""
    command = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(num_gpus), "--master_port", str(free_port()),
               "jobs/train.py", *args]
    handle = open(log, "w")
    return subprocess.Popen(command, cwd=ROOT, env=env or cpu_env(), stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_rank(launcher: subprocess.Popen, local_rank: int, *, expect_pid: int | None = None,
              timeout: float = 180) -> int:
    """SIGKILL the launcher's process of `local_rank` (found among its children by its --local_rank
    argument, the way a fault hits one process) and return the launcher's exit code."""
    import psutil

    def is_rank(process: psutil.Process) -> bool:
        try:
            return f"--local_rank={local_rank}" in process.cmdline()
        except psutil.NoSuchProcess:
            return False

    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if is_rank(p)]
    assert len(ranks) == 1, f"rank {local_rank} not found once among the launcher's processes: {ranks}"
    assert expect_pid in (None, ranks[0].pid), f"rank {local_rank} is pid {ranks[0].pid}, not {expect_pid}"
    os.kill(ranks[0].pid, signal.SIGKILL)
    return launcher.wait(timeout=timeout)


def stop_launch(launcher: subprocess.Popen) -> None:
    """Kill a launcher started by `start_launch` and its processes, if it is still running."""
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def train_cli(args: list[str], *, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`pomvid train ...` (one process, in-process trainer) as a subprocess."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "train", *args], cwd=ROOT, env=env or cpu_env(),
                          capture_output=True, text=True, timeout=timeout)


def output_of(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"


def write_latents(root: Path, *, count: int = 16, shards: int = 2, seed: int = 0,
                  nan_samples: tuple[int, ...] = (), shape: tuple[int, int, int, int] = LATENT_SHAPE) -> Path:
    """A finished latent data set of `count` random samples of `shape` (C, T, H, W) in one bucket; samples
    in `nan_samples` hold a NaN (a corrupt latent, for the non-finite tests)."""
    from pipeline.data.store.index import finish_manifest
    from pipeline.data.store.shards import ShardRow, shard_path, shard_table, write_shard

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    per_shard, unit_ids, n = count // shards, [], 0
    for s in range(shards):
        rows = []
        for _ in range(per_shard):
            latent = rng.standard_normal(shape).astype(np.float32)
            if n in nan_samples:
                latent[0, 0, 0, 0] = np.nan
            rows.append(ShardRow(id=f"clip-{n}", caption=f"a test clip number {n}", latent=latent,
                                 text=rng.standard_normal((3 + n % 3, TEXT_DIM)).astype(np.float32),
                                 source_path=f"/videos/{n}.mp4", source_row=n, clip_start=0.0, clip_end=1.0, fps=8.0,
                                 bucket=BUCKET))
            n += 1
        unit_id = f"unit{s:04d}"
        meta = {"unit_id": unit_id, "videos": per_shard, "buckets": {BUCKET: per_shard}, "failures": {}}
        write_shard(shard_path(root, unit_id), shard_table(rows, storage_dtype="float32", metadata=meta))
        unit_ids.append(unit_id)
    finish_manifest(root, {"buckets": [{"key": BUCKET, "latent_shape": list(shape)}]}, unit_ids)
    return root


def read_steps(run: Path) -> dict[int, dict]:
    """step -> the last record of that step in <run>/steps.jsonl."""
    steps = {}
    for line in (Path(run) / "steps.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record
    return steps


def common_args(data: Path, out: Path, *, steps: int = 6, extra: list[str] = ()) -> list[str]:
    """The tiny debug run the integration tests share: global batch 4, checkpoint at step 3, fp32."""
    return ["--recipe", "debug", "--data", str(data), "--output-dir", str(out), "--tracking", "off",
            "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=3", "--set", "train.keep_checkpoints=0",
            "--set", "validation.every=0", *extra]
