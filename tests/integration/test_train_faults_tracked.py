"""A rank killed in the middle of a tracked training step, and a tracking server killed while training goes
on, with a real `mlflow server`.

The trainer's fault hook (pipeline/train/faults.py, POMVID_FAULT_PAUSE) holds one rank inside a step,
after its forward and before its backward, while the test acts. Both runs train 6 steps through the
`deepspeed` launcher with 2 processes, checkpointing at step 3:

- ZeRO-2, dp=2: the server is killed inside step 2, so steps 2 and 3 and the step-3 checkpoint are
  logged while it is away. It is started again (same port and store) inside step 4, and the spooled
  calls arrive while training waits there. Then rank 0, the one that logs, is SIGKILLed inside step 5.
- ZeRO-3, sp=2: rank 1 is SIGKILLed inside step 5.

Each time the launcher exits non-zero, and `--resume auto` continues from the step-3 checkpoint with
the samples and losses of the uninterrupted reference run. The MLflow run goes on under the same id and
ends FINISHED, with every metric of steps.jsonl at every step, once (step 4 ran twice), and with its
params and artifacts.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.train import checkpoint as ckpt
from pipeline.train.faults import PAUSE_ENV
from tests.deepspeed_launch import (
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
KILL_STEP = 5


def _tracked_args(out: Path, uri: str, experiment: str, settings: tuple[str, ...]) -> list[str]:
    args = [a for a in common_args(train_runs.data(), out) if a not in ("--tracking", "off")]
    sets = [item for setting in settings for item in ("--set", setting)]
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


def _kill_mid_step_then_resume(tmp_path: Path, uri: str, experiment: str, settings: tuple[str, ...], victim: int,
                               during: dict[int, Callable[[], None]] | None = None) -> tuple[str, str]:
    """Train with rank `victim` paused inside each step of `during` (running its action, then going on)
    and SIGKILLed inside step 5; resume; check the launcher, the checkpoints and the losses. Returns
    the MLflow run id and the killed launch's log."""
    during = during or {}
    out, faults, log = tmp_path / "run", tmp_path / "faults", tmp_path / "killed.log"
    args = _tracked_args(out, uri, experiment, settings)
    pauses = ",".join(str(step) for step in [*sorted(during), KILL_STEP])
    proc = start_launch(args, env=cpu_env(**{PAUSE_ENV: f"{victim}:{pauses}:{faults}"}), log=log)
    try:
        for step, action in sorted(during.items()):
            _wait_paused(faults, step, proc, log)
            action()
            (faults / f"release_step_{step}").touch()
        pid = _wait_paused(faults, KILL_STEP, proc, log)
        code = kill_rank(proc, victim, expect_pid=pid)  # after its forward, before its backward
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
    _check_mlflow_run(MlflowClient(uri), experiment, run_id, out)
    return run_id, log.read_text()


def _check_mlflow_run(client: MlflowClient, experiment: str, run_id: str, out: Path) -> None:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [run_id], "the resumed run must continue the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["pomvid.resume_count"] == "1"
    recorded = read_steps(out)
    for field, key in STEP_METRICS.items():  # every steps.jsonl value at its step, once
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == list(range(1, 7)), (key, history)
        for step, value in history:
            assert value == pytest.approx(recorded[step][field], rel=1e-6), (key, step)
    assert run.data.params["recipe"] == "debug" and run.data.params["layout.world_size"] == "2"
    assert run.data.tags["checkpoint.step_00000003"].endswith("step_00000003")
    assert run.data.tags["checkpoint.latest_step"] == "6"
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "plots")}
    expected = {"config.json", "config.resume_1.json", "deepspeed_config.json", "plots/train_loss.png"}
    assert expected <= artifacts, artifacts


def _wait_for_step(client: MlflowClient, tmp_path: Path, step: int, timeout: float = 120) -> None:
    """Until the server holds train/loss at `step` (sent from the spool after the outage)."""
    run_id = ckpt.read_state(tmp_path / "run" / "checkpoints" / "step_00000003")["mlflow_run_id"]
    deadline = time.monotonic() + timeout
    while step not in {m.step for m in client.get_metric_history(run_id, "train/loss")}:
        assert time.monotonic() < deadline, f"train/loss at step {step} never reached the restarted server"
        time.sleep(0.5)


def test_zero2_rank0_killed_mid_step_after_a_tracking_server_outage(mlflow_server_factory, tmp_path):
    server = mlflow_server_factory()

    def restart() -> None:
        server.start()  # the same port and store, while training waits inside step 4
        _wait_for_step(MlflowClient(server.uri), tmp_path, 3)

    _, log = _kill_mid_step_then_resume(tmp_path, server.uri, "killed_rank_zero2", ("engine.zero_stage=2",), 0,
                                        during={2: server.kill, 4: restart})
    assert "logging calls are kept in" in log and server.uri in log, log[-5000:]


def test_zero3_sp2_rank1_killed_mid_step(mlflow_server, tmp_path):
    _kill_mid_step_then_resume(tmp_path, mlflow_server, "killed_rank_zero3_sp2",
                               ("engine.zero_stage=3", "parallel.sp=2"), 1)
