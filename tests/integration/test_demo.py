"""`pomvid demo --quick` end to end, as CI runs it: real MP4s, Ray Data precompute, DeepSpeed through the
launcher (2 CPU processes, sp=2), MLflow in the output folder, sampling, detector score; then the same
command again into the same folder, which must reuse the finished phases and give the same score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.media import read_video

ROOT = Path(__file__).resolve().parents[2]


def run_demo(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--quick", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    first = run_demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return out, first


def test_quick_demo_writes_videos_and_a_score(demo):
    out, result = demo
    score = json.loads((out / "score.json").read_text())
    assert 0.0 <= score["adherence"] <= 1.0
    assert score["num_videos"] == 8  # 2 shapes x 4 held-out colour/direction pairs, one seed each
    assert score["chance_adherence"] == pytest.approx(1 / 16)
    assert set(score["phase_seconds"]) == {"data", "precompute", "train", "sample", "score", "total"}
    held_out = (out / "data" / "held_out.txt").read_text().split("\n")[:-1]
    assert sorted(score["per_caption"]) == sorted(held_out)
    for video in score["videos"]:
        frames = read_video(video["mp4"])
        assert frames.shape[0] == 8 and frames.shape[-1] == 3
        assert Path(video["gif"]).is_file()
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'} --host 127.0.0.1" in result.stdout
    assert f"{out / 'samples'}/" in result.stdout and "caption adherence" in result.stdout
    assert (out / "run" / "latents_manifest.json").is_file()  # sampling works without the latents


def test_mlflow_holds_both_runs_with_params_metrics_and_videos(demo):
    from mlflow import MlflowClient

    out, _ = demo
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pomvid-demo")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"demo-precompute", "demo-train"}
    pre, train = runs["demo-precompute"], runs["demo-train"]
    assert pre.data.metrics["precompute/clips_out"] == 32 and pre.info.status == "FINISHED"
    assert "manifest.json" in [a.path for a in client.list_artifacts(pre.info.run_id)]
    assert train.data.params["model.width"] == "32" and train.data.params["demo.steps"] == "12"
    assert train.data.params["parallel.sp"] == "2"
    assert len(client.get_metric_history(train.info.run_id, "train/loss")) >= 2
    assert 0.0 <= train.data.metrics["demo/adherence"] <= 1.0
    # sp=2: the SP collectives' bytes per optimizer step (CommCounter window), both autograd passes.
    assert train.data.metrics["sp/bytes_per_step/forward"] > 0 < train.data.metrics["sp/bytes_per_step/backward"]
    assert train.data.metrics["demo/seconds_total"] > 0
    videos = [a.path for a in client.list_artifacts(train.info.run_id, "demo_samples")]
    assert len(videos) == 8 and all(v.endswith(".mp4") for v in videos)
    assert "score.json" in [a.path for a in client.list_artifacts(train.info.run_id)]
    assert train.info.status == "FINISHED"


def test_running_again_reuses_the_finished_phases(demo):
    from mlflow import MlflowClient

    out, _ = demo
    before = json.loads((out / "score.json").read_text())
    again = run_demo(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "(resuming)" in again.stdout and "reusing the finished training run" in again.stdout
    after = json.loads((out / "score.json").read_text())
    assert after["adherence"] == before["adherence"]  # same checkpoint, same seeds: same videos
    assert [v["detected_direction"] for v in after["videos"]] == [v["detected_direction"] for v in before["videos"]]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pomvid-demo")
    assert len(client.search_runs([experiment.experiment_id])) == 2  # nothing trained or precomputed again
