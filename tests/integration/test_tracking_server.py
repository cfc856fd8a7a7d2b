"""pipeline.tracking against a real `mlflow server` (SQLite backend, 127.0.0.1, free port), read back with
MlflowClient; `pomvid runs list/compare` on those runs; a server down until a run ended (`pomvid runs
sync`) and a run killed during the outage (resumed); rank-0-only logging across processes; an
unreachable server at start; the embedded SQLite store. A server killed and restarted while training
goes on: tests/integration/test_train_faults_tracked.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline.cli import main as pomvid
from pipeline.tracking import TrackingUnreachableError, start_run
from tests.integration.mlflow_server import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "recipe": "tiny",
    "model": {"width": 64, "depth": 2, "variant": "v1"},
    "data": {"buckets": ["17x32x32", "9x32x64"], "root": Path("/data/latents")},
    "train": {"lr": 1e-3, "steps": 30},
    "prompts": "a red circle moving left " * 40,  # > 500 characters: truncated param, whole in config.json
}
DS_CONFIG = {
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": False},
    "train_micro_batch_size_per_gpu": 1,
}


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _artifacts(client, run_id, path=None):
    out = []
    for item in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return out


def _valid_png(path) -> None:
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"


def _log_run(uri, experiment, lr, losses, tmp_path, name):
    cfg = dict(CONFIG, train={"lr": lr, "steps": len(losses)})
    with start_run(
        config=cfg, tracking_uri=uri, experiment=experiment, run_name=name, system_metrics=False
    ) as tr:
        for step, loss in enumerate(losses):
            tr.log_metrics({"train/loss": loss, "train/samples_per_s": 100.0 + 10 * lr * step}, step=step)
    return tr.run_id


def test_run_is_logged_and_reads_back(mlflow_server, tmp_path):
    mp4, gif = tmp_path / "sample.mp4", tmp_path / "sample.gif"
    mp4.write_bytes(b"\x00\x00\x00\x18ftypmp42 fake mp4")
    gif.write_bytes(b"GIF89a fake gif")
    errors = tmp_path / "errors.jsonl"
    errors.write_text('{"path": "a.mp4", "reason": "corrupt"}\n{"path": "b.mp4", "reason": "too_short"}\n')
    tracker = start_run(
        config=CONFIG,
        tracking_uri=mlflow_server,
        experiment="readback",
        deepspeed_config=DS_CONFIG,
        tags={"pomvid.kind": "train"},
        system_metrics_interval=0.2,
    )
    assert tracker.run_id and tracker.tracking_uri == mlflow_server
    for step in range(30):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 1e-3}, step=step)
    tracker.log_params({"parallel": {"dp": 2, "sp": 1}, "world_size": 2})
    tracker.log_video(mp4, step=10)
    tracker.log_video(gif, step=10)
    mp4.write_bytes(b"overwritten after logging")  # log_video snapshots the file at the call
    tracker.log_checkpoint(tmp_path / "ckpt" / "step_00000030", step=30)
    tracker.log_precompute_summary(counts={"videos": 10, "clips": 8}, elapsed_s=4.0, errors_path=errors)
    time.sleep(0.5)  # a few system metric samples
    tracker.end()

    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("tiny-")
    params = run.data.params
    assert params["model.width"] == "64" and params["train.lr"] == "0.001"
    assert params["deepspeed.zero_optimization.stage"] == "2"
    assert params["data.root"] == "/data/latents"
    assert json.loads(params["data.buckets"]) == ["17x32x32", "9x32x64"]
    assert params["parallel.dp"] == "2" and params["world_size"] == "2"
    assert len(params["prompts"]) == 500 and params["prompts"].endswith("[truncated]")
    assert _history(client, run.info.run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(30)]
    tags = run.data.tags
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert (
        tags["host"] and tags["version.mlflow"] and tags["version.pomvid"] and tags["pomvid.kind"] == "train"
    )
    assert tags["checkpoint.latest"].endswith("ckpt/step_00000030") and tags["checkpoint.latest_step"] == "30"
    assert json.loads(tags["precompute.failures_by_reason"]) == {"corrupt": 1, "too_short": 1}
    assert run.data.metrics["precompute/videos_per_s"] == 2.5
    assert run.data.metrics["precompute/failures/corrupt"] == 1
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert len(_history(client, run.info.run_id, "system/cpu_utilization_percentage")) >= 2

    artifacts = _artifacts(client, run.info.run_id)
    for expected in ["config.json", "deepspeed_config.json", "precompute_summary.json", "errors/errors.jsonl",
                     "samples/step_00000010/sample.mp4", "samples/step_00000010/sample.gif",
                     "plots/train_loss.png", "plots/train_lr.png"]:  # fmt: skip
        assert expected in artifacts, artifacts
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    config = json.loads((local / "config.json").read_text())
    assert config["prompts"] == CONFIG["prompts"] and config["data"]["root"] == "/data/latents"
    assert json.loads((local / "deepspeed_config.json").read_text()) == DS_CONFIG
    assert (local / "samples/step_00000010/sample.mp4").read_bytes().endswith(b"fake mp4")
    _valid_png(local / "plots/train_loss.png")


def test_resume_continues_the_same_run(mlflow_server, caplog):
    first = start_run(config=CONFIG, tracking_uri=mlflow_server, experiment="resume", system_metrics=False)
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step=step)
    first.end("KILLED")  # e.g. preempted

    changed = dict(CONFIG, train={"lr": 5e-4, "steps": 30})
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        second = start_run(
            config=changed,
            tracking_uri=mlflow_server,
            experiment="resume",
            run_id=first.run_id,
            system_metrics=False,
        )
    assert second.run_id == first.run_id
    for step in range(5, 10):
        second.log_metrics({"loss": float(step)}, step=step)
    second.end()

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("resume")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "loss") == [(s, float(s)) for s in range(10)]
    assert run.data.tags["pomvid.resume_count"] == "1"
    assert run.data.params["train.lr"] == "0.001"  # params are immutable: the first value stays
    assert "train.lr" in run.data.tags["pomvid.changed_params_on_resume"]
    assert "train.lr" in caplog.text
    assert "config.resume_1.json" in _artifacts(client, run.info.run_id)
    # Same code and host in both segments: the environment tags stay plain, no resume_1.* copies.
    assert len(run.data.tags["git.commit"]) == 40 and not any(
        k.startswith("resume_1.") for k in run.data.tags
    )


def test_runs_list_and_compare(mlflow_server, tmp_path, capsys):
    experiment = "compare"
    fast = _log_run(mlflow_server, experiment, 1e-3, [1.0, 0.5, 0.3, 0.35], tmp_path, "fast")
    slow = _log_run(mlflow_server, experiment, 1e-4, [1.0, 0.9, 0.8, 0.7], tmp_path, "slow")

    assert pomvid(["runs", "list", "--experiment", experiment, "--tracking-uri", mlflow_server]) == 0
    listing = capsys.readouterr().out
    assert "fast" in listing and "slow" in listing and "FINISHED" in listing and "loss" in listing
    assert pomvid(["runs", "list", "--experiment", experiment, "--tracking-uri", mlflow_server,
                   "--columns", "name,status,train.lr"]) == 0
    assert "train.lr" in capsys.readouterr().out

    out = tmp_path / "plots"
    args = ["runs", "compare", "--experiment", experiment, "--tracking-uri", mlflow_server, "--out", str(out)]
    assert pomvid([*args, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["differing_params"]) == ["train.lr"]  # only the param that differs
    assert data["differing_params"]["train.lr"] == {"slow": "0.0001", "fast": "0.001"}
    loss = data["metrics"]["train/loss"]
    assert loss["best"] == "min" and loss["runs"]["fast"]["final"] == 0.35
    assert loss["runs"]["fast"]["best"] == 0.3 and loss["runs"]["fast"]["best_step"] == 2
    assert data["metrics"]["train/samples_per_s"]["best"] == "max"
    for path in data["plots"].values():
        _valid_png(path)
    assert sorted(p.name for p in out.iterdir()) == ["train_loss.png", "train_samples_per_s.png"]

    assert pomvid([*args, "--runs", fast[:8], slow, "--metric", "train/loss", "--format", "table"]) == 0
    table = capsys.readouterr().out
    assert "param train.lr" in table and "train/loss best (min)" in table and "0.3" in table
    assert "train/samples_per_s mean" in table  # throughput is always compared
    assert f"plots (2 PNG, one curve per run): {out.resolve()}" in table

    assert pomvid([*args, "--runs", "no-such-run"]) == 1
    assert "no-such-run" in capsys.readouterr().err


KILLED_RUN = """
import sys, time
from pipeline.tracking import start_run
tracker = start_run(config={"recipe": "killed"}, tracking_uri=sys.argv[1], experiment="killed", output_dir=sys.argv[2],
                    system_metrics=False)
print(tracker.run_id, flush=True)
for step in range(5):
    tracker.log_metrics({"loss": float(step)}, step=step)
assert tracker.flush(60)
print("sent", flush=True)
sys.stdin.readline()  # the test kills the server meanwhile
for step in range(5, 10):
    tracker.log_metrics({"loss": float(step)}, step=step)
tracker.log_params({"late": 1})
print("spooled", flush=True)
time.sleep(600)  # SIGKILLed here: no end()
"""


def test_outage_until_the_end_and_a_killed_run_lose_nothing(mlflow_server_factory, tmp_path, capsys, caplog):
    """One server outage, two runs: `ended` ends while the server is down and `pomvid runs sync` completes
    it (twice: nothing twice); `killed` is SIGKILLed during the outage, its spool ends in a record cut in
    the middle of its write, and its resumed run sends the leftovers first and skips the cut record."""
    server = mlflow_server_factory()
    ended_dir, killed_dir = tmp_path / "ended", tmp_path / "killed"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_RUN, server.uri, str(killed_dir)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        ended = start_run(config=CONFIG, tracking_uri=server.uri, experiment="ended", output_dir=ended_dir,
                          system_metrics=False)
        ended.log_metrics({"loss": 1.0}, step=0)
        assert ended.flush(30)
        killed_id = killed.stdout.readline().strip()
        assert killed.stdout.readline().strip() == "sent", killed.stderr.read() if killed.poll() is not None else ""

        server.kill()
        killed.stdin.write("\n")
        killed.stdin.flush()
        video = tmp_path / "sample.mp4"
        video.write_bytes(b"\x00\x00\x00\x18ftypmp42 fake mp4")
        with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
            for step in range(1, 10):
                ended.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            ended.log_params({"late": "yes"})
            ended.log_video(video, step=9)
            ended.log_checkpoint(ended_dir / "checkpoints" / "step_00000009", step=9)
            ended.end()  # the server is still down
        assert any("pomvid runs sync" in r.getMessage() for r in caplog.records), caplog.text
        assert killed.stdout.readline().strip() == "spooled"
    finally:
        killed.kill()  # SIGKILL: a crash while the server is away
        killed.wait()
    with open(killed_dir / "mlflow_spool" / killed_id / "log-000001.jsonl", "ab") as handle:
        handle.write(b'0badc0de {"metrics":[["loss",99.0,10]],"op":"met')  # the write the kill cut short

    server.start()  # the same port and store
    client = MlflowClient(server.uri)
    assert client.get_run(ended.run_id).info.status == "RUNNING" and len(_history(client, ended.run_id, "loss")) == 1
    assert pomvid(["runs", "sync", str(ended_dir)]) == 0
    report = capsys.readouterr().out
    assert ended.run_id in report and "9 metric values" in report and "status FINISHED" in report, report
    run = client.get_run(ended.run_id)
    assert run.info.status == "FINISHED"
    assert _history(client, ended.run_id, "loss") == [(0, 1.0)] + [(s, 1.0 / (s + 1)) for s in range(1, 10)]
    assert run.data.params["late"] == "yes" and run.data.params["model.width"] == "64"
    assert run.data.tags["checkpoint.latest_step"] == "9"
    artifacts = _artifacts(client, ended.run_id)
    for expected in ("config.json", "samples/step_00000009/sample.mp4", "plots/loss.png"):
        assert expected in artifacts, artifacts
    assert pomvid(["runs", "sync", str(ended_dir)]) == 0  # idempotent: nothing is logged twice
    assert "nothing to send" in capsys.readouterr().out
    assert len(_history(client, ended.run_id, "loss")) == 10

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        resumed = start_run(config={"recipe": "killed"}, tracking_uri=server.uri, experiment="killed",
                            output_dir=killed_dir, run_id=killed_id, system_metrics=False)
        for step in range(8, 12):  # resumed from a checkpoint at step 7: steps 8 and 9 run again
            resumed.log_metrics({"loss": float(step)}, step=step)
        resumed.end()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("cut off" in m for m in messages) == 1, messages
    assert any("not sent yet" in m for m in messages) and any("not logged again" in m for m in messages)
    run = client.get_run(killed_id)
    assert _history(client, killed_id, "loss") == [(s, float(s)) for s in range(12)]  # every step, once
    assert run.data.params["late"] == "1" and run.info.status == "FINISHED"
    assert run.data.tags["pomvid.resume_count"] == "1"


def test_only_rank_zero_logs(mlflow_server, tmp_path):
    script = (
        "import json, sys\n"
        "from pipeline.tracking import start_run\n"
        "t = start_run(config={'recipe': 'ranks'}, experiment='ranks', system_metrics=False)\n"
        "t.log_metrics({'loss': 1.0}, step=0)\n"
        "t.end()\n"
        "print(json.dumps({'run_id': t.run_id, 'enabled': t.enabled}))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MLFLOW_TRACKING_URI=mlflow_server),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["enabled"] and results[0]["run_id"]
    assert results[1] == {"run_id": None, "enabled": False}
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("ranks").experiment_id])
    assert [r.info.run_id for r in runs] == [results[0]["run_id"]]


def test_unreachable_server_fails_fast_with_a_clear_error(monkeypatch, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingUnreachableError) as info:
        start_run(config=CONFIG, tracking_uri=uri, output_dir=tmp_path)
    assert time.monotonic() - start < 10
    assert (
        uri in str(info.value) and "--tracking off" in str(info.value) and "mlflow server" in str(info.value)
    )

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the same through the environment
    with pytest.raises(TrackingUnreachableError, match="not reachable"):
        start_run(config=CONFIG, output_dir=tmp_path)
    assert not start_run(config=CONFIG, output_dir=tmp_path, enabled=False).enabled  # --tracking off


def test_embedded_sqlite_store_in_the_output_dir(tmp_path, capsys):
    out = tmp_path / "outputs" / "tiny"
    with start_run(config=CONFIG, output_dir=out, experiment="local", system_metrics=False) as tracker:
        tracker.log_metrics({"train/loss": 0.5}, step=1)
    assert (out / "mlflow.db").is_file()
    assert (out / "mlartifacts").is_dir() and list((out / "mlartifacts").rglob("config.json"))
    assert pomvid(["runs", "list", "--experiment", "local", "--output-dir", str(out), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run_id,name,status") and tracker.run_id[:8] in lines[1] and "0.5" in lines[1]
    assert pomvid(["runs", "compare", "--experiment", "local", "--output-dir", str(out)]) == 0
    _valid_png(out / "compare" / "local" / "train_loss.png")
