"""Multi-node DeepSpeed the way Kubernetes starts it: one `jobs/launch/multi_node.sh --no-ssh` launcher
per node, each with its own --node-rank. Here the two "nodes" are two launchers on this machine (one
CPU process each, rendezvous on 127.0.0.1) that must form one world of 2 ranks, finish together and
train exactly like the same 2 ranks started by one launcher (train_runs' "zero2" run, shared by the
session with tests/integration/test_train_equivalence.py)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from pipeline.train import checkpoint as ckpt
from tests.deepspeed_launch import ROOT, common_args, cpu_env, free_port, read_steps
from tests.integration import train_runs

pytestmark = pytest.mark.slow
TIMEOUT_S = 420


def _start(node_rank: int, port: int, args: list[str], log: Path, env: dict) -> subprocess.Popen:
    command = ["bash", "jobs/launch/multi_node.sh", "--no-ssh", "--num-nodes", "2", "--node-rank", str(node_rank),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "--gpus-per-node", "1", *args]
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_all(launchers: list[subprocess.Popen]) -> list[int]:
    try:
        return [launcher.wait(timeout=TIMEOUT_S) for launcher in launchers]
    finally:
        for launcher in launchers:  # a launcher left waiting for its peer must not outlive the test
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()


def test_two_launchers_one_per_node_train_together(tmp_path):
    out = tmp_path / "run"
    args = common_args(train_runs.data(), out)  # the arguments of train_runs' runs: 6 steps, dp=2, ZeRO-2
    env = cpu_env(TMPDIR=str(tmp_path))  # the generated hostfile lands in the test's folder
    port = free_port()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    codes = _wait_all([_start(rank, port, args, logs[rank], env) for rank in (0, 1)])
    output = "\n".join(f"--- node {rank} (exit {code})\n{logs[rank].read_text()[-5000:]}"
                       for rank, code in enumerate(codes))
    assert codes == [0, 0], output

    # The generated hostfile: 2 nodes of 1 process; each launcher ran its own node's rank only.
    assert (tmp_path / "pomvid-hostfile-2x1").read_text().split("\n")[:2] == ["node-0 slots=1", "node-1 slots=1"]
    for rank, log in enumerate(logs):
        text = log.read_text()
        assert f"--node_rank={rank}" in text and "dist_world_size=2" in text, output

    # One world of 2 ranks wrote each checkpoint, each rank its own files ...
    latest = ckpt.find_latest(out / "checkpoints")
    assert latest is not None and latest.name == "step_00000006"
    assert ckpt.read_state(latest)["world_size"] == 2
    assert sorted(p.name for p in (latest / "rng").iterdir()) == ["rank_00000.json", "rank_00001.json"]
    # ... and trained step for step like the 2 ranks that one launcher starts on one node.
    got, reference = read_steps(out), read_steps(train_runs.run("zero2"))
    assert sorted(got) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for step in got:
        assert got[step]["indices"] == reference[step]["indices"], f"step {step}: other samples"
        assert got[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6), f"step {step}"
        assert got[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-6), f"step {step}"
