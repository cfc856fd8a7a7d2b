"""Training runs shared by the train integration tests, each made once per pytest session.

Every run trains the `debug` recipe on the same 16-sample latent data set with the same global batch
(4) and seed for 6 steps, checkpointing at step 3, so their losses, gradient norms, learning rates,
samples and EMA must agree; they differ only in how the work is spread:

    reference   1 process (`pomvid train`, the trainer in-process)
    zero1       2 processes, dp=2, ZeRO-1 (`pomvid train --num_gpus 2`, which starts the launcher)
    zero3       2 processes, dp=2, ZeRO-3 with activation checkpointing per block
                (`deepspeed --num_gpus 2 jobs/train.py`)
    zero2       2 processes, dp=2, ZeRO-2 (`jobs/launch/single_node.sh --gpus 2`)
    sp2         2 processes, dp=1 x sp=2 (frames sharded), ZeRO-2

A run that fails raises with its output. Folders live in one temporary directory removed at exit.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.deepspeed_launch import (
    ROOT,
    common_args,
    cpu_env,
    free_port,
    launch,
    output_of,
    train_cli,
    write_latents,
)

_BASE = Path(tempfile.mkdtemp(prefix="pomvid-train-runs-"))
atexit.register(shutil.rmtree, _BASE, ignore_errors=True)
_DONE: dict[str, Path] = {}

RUNS = {
    "reference": {"procs": 1, "set": []},
    "zero1": {"procs": 2, "set": ["engine.zero_stage=1"], "script": "pomvid"},
    "zero2": {"procs": 2, "set": ["engine.zero_stage=2"], "script": "single_node"},
    "zero3": {"procs": 2, "set": ["engine.zero_stage=3", "engine.activation_checkpointing=true"]},
    "sp2": {"procs": 2, "set": ["parallel.sp=2", "engine.zero_stage=2"]},
}


def data() -> Path:
    if "data" not in _DONE:
        _DONE["data"] = write_latents(_BASE / "latents")
    return _DONE["data"]


def base() -> Path:
    return _BASE


def run(name: str) -> Path:
    """The output folder of run `name` (trained on first use)."""
    if name in _DONE:
        return _DONE[name]
    spec = RUNS[name]
    out = _BASE / name
    extra = [item for override in spec["set"] for item in ("--set", override)]
    args = common_args(data(), out, extra=extra)
    if spec["procs"] == 1:
        result = train_cli(args)
    elif spec.get("script") == "pomvid":
        result = train_cli([*args, "--num_gpus", "2", "--master_port", str(free_port())], timeout=420)
    elif spec.get("script") == "single_node":
        result = subprocess.run(["bash", "jobs/launch/single_node.sh", "--gpus", "2", "--master-port", str(free_port()),
                                 *args], cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=420)
    else:
        result = launch(args, num_gpus=2)
    if result.returncode != 0:
        raise RuntimeError(f"training run {name} failed:\n{output_of(result)}")
    _DONE[name] = out
    return out
