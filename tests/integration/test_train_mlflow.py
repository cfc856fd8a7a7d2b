"""A short training run leaves an MLflow run (on a real `mlflow server`) with params, metrics, the
checkpoint's location and a validation video sampled with the EMA weights; a resume continues it."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from pipeline.media import read_video
from pipeline.train import checkpoint as ckpt
from tests.deepspeed_launch import common_args, output_of, train_cli
from tests.integration import train_runs

pytestmark = pytest.mark.slow
EXPERIMENT = "test_train_mlflow"


def _args(out, server, steps):
    args = common_args(train_runs.data(), out, steps=steps)
    args = [a for a in args if a not in ("--tracking", "off")]  # tracking on, to the server
    return args + ["--tracking-uri", server, "--experiment", EXPERIMENT, "--set", "validation.every=3",
                   "--set", "validation.steps=2", "--set", "train.log_every=1"]


def test_run_has_params_metrics_and_a_validation_video(tmp_path, mlflow_server):
    out = tmp_path / "run"
    result = train_cli(_args(out, mlflow_server, steps=3))
    assert result.returncode == 0, output_of(result)
    state = ckpt.read_state(ckpt.find_latest(out / "checkpoints"))
    run_id = state["mlflow_run_id"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["recipe"] == "debug" and float(params["optim.lr"]) == pytest.approx(1e-3)
    assert params["deepspeed.zero_optimization.stage"] == "2"
    for metric in ("train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/tokens_per_s",
                   "perf/step_time_s", "perf/data_wait_s", "perf/data_wait_max_s", "memory/peak_gb"):
        history = client.get_metric_history(run_id, metric)
        assert [m.step for m in history] == [1, 2, 3], metric
    assert run.data.tags["checkpoint.latest_step"] == "3"
    videos = [a.path for a in client.list_artifacts(run_id, "samples/step_00000003")]
    assert len(videos) == 2 and all(v.endswith(".mp4") for v in videos), videos
    local = client.download_artifacts(run_id, videos[0], str(tmp_path / "download"))
    frames = read_video(local)
    assert frames.ndim == 4 and frames.shape[0] == 4 and frames.shape[-1] == 3  # 4 latent frames shown
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 3

    # A resume continues the same MLflow run.
    result = train_cli(_args(out, mlflow_server, steps=4) + ["--resume", "auto"])
    assert result.returncode == 0, output_of(result)
    assert ckpt.read_state(ckpt.find_latest(out / "checkpoints"))["mlflow_run_id"] == run_id
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
