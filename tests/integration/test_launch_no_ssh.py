"""Multi-node DeepSpeed the way Kubernetes starts it: one `jobs/launch/multi_node.sh --no-ssh` launcher
per node, each with its own --node-rank. Here the two "nodes" are two launchers on this machine (one
CPU process each, rendezvous on 127.0.0.1) that must form one world of 2 ranks, finish together and
train exactly like the same 2 ranks started by one launcher (train_runs' "zero2" run, shared by the
session with tests/integration/test_train_equivalence.py).

Nodes without a shared disk: each launcher gets its own --output-dir. Without a checkpoint mirror the
shared-folder check stops both at start with its error; with `train.checkpoint_mirror` on the S3 fixture
they train, checkpoint to the mirror, and a resume on EMPTY local folders continues from the mirror with
the reference run's losses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from pipeline.train import checkpoint as ckpt
from pipeline.train.shared_folder import MARKERS
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


def _train_two_nodes(tmp_path: Path, outs: list[Path], *, extra: list[str] = (), env: dict | None = None,
                     name: str = "", data: str | Path | None = None) -> tuple[list[int], list[Path], str]:
    """Both launchers, node n training into outs[n] (the same folder twice: a shared disk); returns
    (exit codes, logs, their tails for assertion messages). `data`: the latents (train_runs' folder
    by default; an s3:// copy for nodes without a shared disk)."""
    env = env or cpu_env(TMPDIR=str(tmp_path))  # the generated hostfile lands in the test's folder
    port = free_port()
    logs = [tmp_path / f"{name}node{rank}.log" for rank in (0, 1)]
    # the arguments of train_runs' runs: 6 steps, dp=2, ZeRO-2
    launchers = [_start(rank, port, common_args(data or train_runs.data(), outs[rank], extra=extra), logs[rank], env)
                 for rank in (0, 1)]
    codes = _wait_all(launchers)
    output = "\n".join(f"--- node {rank} (exit {code})\n{logs[rank].read_text()[-5000:]}"
                       for rank, code in enumerate(codes))
    return codes, logs, output


def _assert_like_reference(out: Path, steps: list[int]) -> None:
    got, reference = read_steps(out), read_steps(train_runs.run("zero2"))
    assert sorted(got) == steps
    for step in steps:
        assert got[step]["indices"] == reference[step]["indices"], f"step {step}: other samples"
        assert got[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6), f"step {step}"
        assert got[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-6), f"step {step}"


def test_node_local_folders_without_mirror_stop_at_start(tmp_path):
    outs = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]  # two "nodes", each with its own disk
    codes, logs, output = _train_two_nodes(tmp_path, outs)
    assert codes[0] != 0 and codes[1] != 0, output
    error = logs[0].read_text()
    assert "train.output_dir is not one folder shared by all nodes" in error, output
    assert f"sees the markers of rank 0 on host {socket.gethostname()} ({outs[0]})" in error, output
    assert f"but not those of rank 1 on host {socket.gethostname()} ({outs[1]})" in error, output
    assert "train.checkpoint_mirror=s3://" in error, output
    assert not (outs[0] / "checkpoints").exists() and not (outs[1] / "checkpoints").exists()


def test_two_launchers_one_per_node_train_together_and_resume_from_the_mirror(tmp_path, s3_server):
    """Two nodes with their own disks, latents on object storage and a checkpoint mirror: they train
    together (reading the latents from s3://), checkpoint to the mirror, and fresh nodes (empty folders)
    resume from it with the losses of an uninterrupted run on the local latents."""
    bucket = s3_server.create_bucket("mirror")
    mirror = f"s3://{bucket}/runs/two-nodes"
    local_data = train_runs.data()
    for file in sorted(p for p in local_data.rglob("*") if p.is_file()):  # the same latents, in the bucket
        s3_server.client().upload_file(str(file), bucket, f"latents/{file.relative_to(local_data)}")
    data = f"s3://{bucket}/latents"
    env = cpu_env(TMPDIR=str(tmp_path), **s3_server.env)
    outs = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    extra = ["--set", f"train.checkpoint_mirror={mirror}", "--set", "train.keep_checkpoints=1"]

    # Steps 1-3, stopping with the checkpoint of step 3 (then the "nodes" go away).
    codes, logs, output = _train_two_nodes(tmp_path, outs, extra=[*extra, "--set", "train.stop_at=3"], env=env,
                                           name="first-", data=data)
    assert codes == [0, 0], output
    # The generated hostfile: 2 nodes of 1 process; each launcher ran its own node's rank only ...
    assert (tmp_path / "pomvid-hostfile-2x1").read_text().split("\n")[:2] == ["node-0 slots=1", "node-1 slots=1"]
    for rank, log in enumerate(logs):
        text = log.read_text()
        assert f"--node_rank={rank}" in text and "dist_world_size=2" in text, output
    # ... one world of 2 ranks, trained step for step like the 2 ranks one launcher starts on one node
    # (whose shared folder passed the shared-folder check: the run exists, and the markers are gone).
    assert ckpt.read_state(outs[0] / "checkpoints/step_00000003")["world_size"] == 2
    _assert_like_reference(outs[0], [1, 2, 3])
    assert not (train_runs.run("zero2") / MARKERS).exists() and not (outs[0] / MARKERS).exists()
    keys = s3_server.list_keys(bucket, "runs/two-nodes/")
    step3 = [k.split("step_00000003/", 1)[1] for k in keys if "/step_00000003/" in k]
    assert "COMPLETE" in step3 and "trainer_state.json" in step3 and "ema.safetensors" in step3, keys
    assert {"rng/rank_00000.json", "rng/rank_00001.json", ".uploaded/rank_00000", ".uploaded/rank_00001"} <= set(step3)
    # each rank uploaded its own ZeRO shard, which exists on its own node only
    assert (outs[1] / "checkpoints/step_00000003/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    assert not (outs[0] / "checkpoints/step_00000003/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    assert {"deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(step3), keys
    assert s3_server.read(bucket, "runs/two-nodes/latest") == b"step_00000003\n"
    assert "runs/two-nodes/conditioning.safetensors" in keys  # the null caption, for fresh nodes

    # Fresh nodes: empty local folders. --resume auto restores step 3 from the mirror, steps 4-6 follow.
    for out in outs:
        shutil.rmtree(out)
    codes, logs, output = _train_two_nodes(tmp_path, outs, extra=[*extra, "--resume", "auto"], env=env,
                                           name="resumed-", data=data)
    assert codes == [0, 0], output
    assert "resuming from the mirrored checkpoint step 3" in logs[0].read_text(), output
    _assert_like_reference(outs[0], [4, 5, 6])
    # Retention (keep 1) applies to the mirror: step 3 went once step 6 was complete there.
    keys = s3_server.list_keys(bucket, "runs/two-nodes/")
    assert not any("/step_00000003/" in k for k in keys), keys
    assert "runs/two-nodes/step_00000006/COMPLETE" in keys
    assert s3_server.read(bucket, "runs/two-nodes/latest") == b"step_00000006\n"
