"""Jobs on a real local Ray cluster (`ray start --head` on 127.0.0.1, token auth on), submitted the way
users submit them: `ray job submit` and `pomvid submit`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.ray_cluster import start_cluster, stop_cluster

ROOT = Path(__file__).resolve().parents[2]
POMVID = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = start_cluster(num_cpus=2)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


def test_submission_without_a_valid_token_says_how_to_provide_one(ray_cluster, tmp_path):
    env = dict(ray_cluster.env, RAY_AUTH_TOKEN="not-the-token", HOME=str(tmp_path))
    result = ray_cluster.run(*POMVID, "submit", "status", "raysubmit_none", "--address", ray_cluster.address, env=env, cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "RAY_AUTH_TOKEN" in result.stderr and "--token-file" in result.stderr

    env.pop("RAY_AUTH_TOKEN")
    result = ray_cluster.run(*POMVID, "submit", "status", "raysubmit_none", "--address", ray_cluster.address, env=env, cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "authentication token" in result.stderr


def test_token_file_is_accepted(ray_cluster, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(ray_cluster.token + "\n")
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = str(tmp_path)
    result = ray_cluster.run(
        *POMVID, "submit", "status", "raysubmit_none", "--address", ray_cluster.address, "--token-file", str(token_file),
        env=env, cwd=ROOT,
    )
    # Authenticated: the server answers that no such job exists (not an auth error).
    assert "authentication" not in (result.stdout + result.stderr).lower(), result.stderr
    assert "raysubmit_none" in result.stderr, result.stderr


def _mlflow_runs(db: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {db}"
    return client.search_runs([found.experiment_id])


def test_training_job_survives_a_killed_worker(ray_cluster, tmp_path):
    """Two Ray Train workers form one process group (dp=2) and train; worker 1 is SIGKILLed inside step 5 (held there by the trainer's fault hook, found by the pid
    it writes): Ray Train restarts the group, which resumes from the step-3 checkpoint by itself; the
    job succeeds with the samples and losses of the uninterrupted reference run, one MLflow run, each step
    once."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.faults import PAUSE_ENV
    from tests.deepspeed_launch import common_args, read_steps
    from tests.integration import train_runs

    out, db, faults, log = tmp_path / "run", tmp_path / "mlflow.db", tmp_path / "faults", tmp_path / "job.log"
    train_args = common_args(train_runs.data(), out, steps=6)
    tracking = train_args.index("--tracking")
    train_args[tracking:tracking + 2] = ["--tracking-uri", f"sqlite:///{db}", "--experiment", "ray-restart",
                                         "--set", "train.log_every=1"]
    env = dict(ray_cluster.env, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [*POMVID, "submit", "train", "--address", ray_cluster.address, "--follow", "--env", "DS_ACCELERATOR=cpu",
               "--env", "OMP_NUM_THREADS=1", "--env", f"{PAUSE_ENV}=1:5:{faults}", "--", "--workers", "2",
               "--cpus-per-worker", "1", "--max-failures", "1", "--", *train_args]
    with open(log, "w") as handle:
        job = subprocess.Popen(command, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not (faults / "reached_step_5").exists():
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.5)
        os.kill(int((faults / "reached_step_5").read_text()), signal.SIGKILL)  # the worker, mid-step
        assert job.wait(timeout=900) == 0, log.read_text()[-6000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    text = log.read_text()
    assert "ended: SUCCEEDED" in text and "resumed from" in text and "step_00000003" in text, text[-6000:]
    assert "world_size=2" in text, text[-6000:]  # two Ray Train workers formed one process group
    reference, steps = read_steps(train_runs.run("reference")), read_steps(out)
    for step in range(1, 7):
        assert steps[step]["indices"] == reference[step]["indices"], f"step {step}"
        assert steps[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4), f"step {step}"
    runs = _mlflow_runs(db, "ray-restart")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["layout.world_size"] == "2" and runs[0].data.params["layout.dp"] == "2"
    history = MlflowClient(tracking_uri=f"sqlite:///{db}").get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]


def test_precompute_job_submitted_with_ray_job_submit(ray_cluster, tmp_path):
    from pipeline.data.encode.text_clip import make_tiny_clip
    from pipeline.data.store.shards import read_output_manifest
    from pipeline.demo.shapes import ShapesConfig, write_shapes_dataset

    manifest = write_shapes_dataset(tmp_path / "videos", ShapesConfig(frames=8, height=16, width=16), count=4)
    clip = make_tiny_clip(tmp_path / "clip")
    out = tmp_path / "latents"
    db = tmp_path / "mlflow.db"
    args = [
        "--manifest", str(manifest), "--out", str(out), "--buckets", "8x16x16", "--fps", "8", "--vae", "pixel",
        "--vae-config", '{"spatial": 2}', "--text-encoder", "clip", "--text-encoder-path", str(clip),
        "--rows-per-work-unit", "2", "--decode-num-cpus", "0.5", "--vae-num-cpus", "0.5", "--text-num-cpus", "0.5",
        "--no-progress", "--tracking-uri", f"sqlite:///{db}", "--experiment", "ray-precompute",
    ]
    ray_cli = str(Path(sys.executable).parent / "ray")
    result = ray_cluster.run(ray_cli, "job", "submit", "--address", ray_cluster.address, "--working-dir", ".", "--",
                             "python", "jobs/precompute_latents.py", *args, cwd=ROOT, timeout=900)
    log = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, log
    assert "succeeded" in (result.stdout + result.stderr).lower(), log  # "Job ... succeeded"
    written = read_output_manifest(out)
    assert written["status"] == "complete" and written["totals"]["clips"] == 4, written
    runs = _mlflow_runs(db, "ray-precompute")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["pomvid.kind"] == "precompute"
    assert runs[0].data.metrics["precompute/clips_out"] == 4
