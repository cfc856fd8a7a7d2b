"""Faults in the middle of a tracked training step, on a real `mlflow server`.

The trainer's fault hook (pipeline/train/faults.py, POMVID_FAULT_PAUSE) holds one rank inside a step,
after its forward and before its backward, while the test acts:

- the tracking server is killed at step 3 and started again (same port and store) at step 6 while
  training goes on: the MLflow run has every metric at every step of steps.jsonl, its params and
  artifacts, and ends FINISHED;
- one rank is SIGKILLed inside step 5 (ZeRO-2 with dp=2: rank 0, the one that logs; ZeRO-3 with sp=2:
  rank 1): the `deepspeed` launcher exits non-zero, `--resume auto` continues from the step-3
  checkpoint with the samples and losses of the uninterrupted reference run, and the MLflow run goes
  on under the same id with each step once (step 4 ran twice; it is recorded once).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.train import checkpoint as ckpt
from pipeline.train.faults import PAUSE_ENV
from tests.deepspeed_launch import (
    ROOT,
    common_args,
    cpu_env,
    kill_rank,
    launch,
    output_of,
    read_steps,
    start_launch,
    stop_launch,
)
from tests.integration import train_runs

pytestmark = pytest.mark.slow
STEP_METRICS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm"}


def _tracked_args(out: Path, uri: str, experiment: str, *, steps: int = 6, extra: tuple[str, ...] = ()) -> list[str]:
    args = [a for a in common_args(train_runs.data(), out, steps=steps) if a not in ("--tracking", "off")]
    sets = [item for setting in extra for item in ("--set", setting)]
    return args + sets + ["--tracking-uri", uri, "--experiment", experiment, "--set", "train.log_every=1"]


def _wait_paused(faults: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 400) -> int:
    """The pid of the rank paused inside `step` (it writes it when it gets there)."""
    reached = faults / f"reached_step_{step}"
    deadline = time.monotonic() + timeout
    while not reached.exists():
        assert proc.poll() is None, f"training exited with {proc.returncode} before step {step}:\n" + \
            log.read_text()[-5000:]
        assert time.monotonic() < deadline, f"step {step} was never reached:\n" + log.read_text()[-3000:]
        time.sleep(0.2)
    return int(reached.read_text())


def _release(faults: Path, step: int) -> None:
    (faults / f"release_step_{step}").touch()


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _assert_every_step_once(client: MlflowClient, run_id: str, out: Path, steps: int) -> None:
    """Each steps.jsonl value appears in MLflow at its step, exactly once."""
    recorded = read_steps(out)
    assert sorted(recorded) == list(range(1, steps + 1))
    for field, key in STEP_METRICS.items():
        history = _history(client, run_id, key)
        assert [s for s, _ in history] == list(range(1, steps + 1)), (key, history)
        for step, value in history:
            assert value == pytest.approx(recorded[step][field], rel=1e-6), (key, step)


def test_training_keeps_every_metric_through_a_tracking_server_outage(mlflow_server_factory, tmp_path):
    server = mlflow_server_factory()
    out, faults, log = tmp_path / "run", tmp_path / "faults", tmp_path / "train.log"
    args = _tracked_args(out, server.uri, "outage", steps=8)
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", *args], cwd=ROOT, stdout=handle,
                                stderr=subprocess.STDOUT, env=cpu_env(**{PAUSE_ENV: f"0:3,6:{faults}"}))
    try:
        _wait_paused(faults, 3, proc, log)
        server.kill()  # steps 3, 4 and 5 (and the step-3 checkpoint) are logged while it is away
        _release(faults, 3)
        _wait_paused(faults, 6, proc, log)
        server.start()  # the same port and store
        _release(faults, 6)
        assert proc.wait(timeout=400) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "logging calls are kept in" in text and "is back" in text, text[-5000:]

    run_id = ckpt.read_state(ckpt.find_latest(out / "checkpoints"))["mlflow_run_id"]
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    _assert_every_step_once(client, run_id, out, steps=8)
    assert run.data.params["recipe"] == "debug" and run.data.params["deepspeed.zero_optimization.stage"] == "2"
    assert run.data.tags["checkpoint.latest_step"] == "8"
    assert run.data.tags["checkpoint.step_00000003"].endswith("step_00000003")  # logged during the outage
    artifacts = {a.path for a in client.list_artifacts(run_id)} | \
        {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"config.json", "deepspeed_config.json", "plots/train_loss.png"} <= artifacts, artifacts


@pytest.mark.parametrize("name, settings, victim", [
    ("zero2", ("engine.zero_stage=2",), 0),
    ("zero3_sp2", ("engine.zero_stage=3", "parallel.sp=2"), 1),
])
def test_rank_killed_mid_step_then_resume_auto(mlflow_server, tmp_path, name, settings, victim):
    out, faults, log = tmp_path / "run", tmp_path / "faults", tmp_path / "killed.log"
    experiment = f"killed_rank_{name}"
    args = _tracked_args(out, mlflow_server, experiment, extra=settings)
    proc = start_launch(args, env=cpu_env(**{PAUSE_ENV: f"{victim}:5:{faults}"}), log=log)
    try:
        pid = _wait_paused(faults, 5, proc, log)
        code = kill_rank(proc, victim, expect_pid=pid)  # inside step 5: after its forward, before its backward
    finally:
        stop_launch(proc)
    assert code != 0, "the launcher reported success although a rank was killed"
    root = out / "checkpoints"
    assert ckpt.find_latest(root) == root / "step_00000003" and not (root / "step_00000006").exists()
    run_id = ckpt.read_state(root / "step_00000003")["mlflow_run_id"]
    assert run_id and sorted(read_steps(out)) == [1, 2, 3, 4]  # step 5 never completed

    result = launch(args + ["--resume", "auto"], num_gpus=2)
    assert result.returncode == 0, output_of(result)
    assert "resumed from" in result.stdout and "step_00000003" in result.stdout, output_of(result)
    assert ckpt.read_state(ckpt.find_latest(root))["mlflow_run_id"] == run_id
    reference, steps = read_steps(train_runs.run("reference")), read_steps(out)
    for step in range(1, 7):  # step 4 ran twice: the resumed run's record is the last one
        assert steps[step]["indices"] == reference[step]["indices"], f"step {step}"
        assert steps[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4), f"step {step}"

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [run_id], "the resumed run must continue the same MLflow run"
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["pomvid.resume_count"] == "1"
    _assert_every_step_once(client, run_id, out, steps=6)
