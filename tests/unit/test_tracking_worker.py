"""The background logger (retries, outages, permanent errors, batching, a full queue, flush/close) and the
Tracker on top of it, with a fake MLflow client: no server, no sleeps beyond a few hundred ms."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import pytest

from pipeline.tracking.tracker import Tracker
from pipeline.tracking.worker import LogWorker, Op


class Rejected(Exception):
    error_code = "INVALID_PARAMETER_VALUE"


def make_worker(send_metrics=None, **kwargs) -> LogWorker:
    options = {"attempts": 3, "backoff_s": 0.01, "down_retry_s": 0.05}
    options.update(kwargs)
    return LogWorker(target="http://test:5000", send_metrics=send_metrics or (lambda batch: None), **options)


def warnings_of(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pipeline.tracking" and r.levelno >= logging.WARNING
    ]


def test_transient_failures_are_retried(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")

    worker = make_worker()
    worker.submit(Op(description="flaky", fn=flaky))
    assert worker.flush(5)
    worker.close(5)
    assert len(calls) == 3 and worker.dropped_total == 0 and not warnings_of(caplog)


def test_an_outage_warns_once_drops_and_recovers(caplog):
    up = threading.Event()
    sent = []

    def send():
        if not up.is_set():
            raise ConnectionError("connection refused")
        sent.append(1)

    worker = make_worker()
    for _ in range(20):
        assert worker.submit(Op(description="call", fn=send)) in (True, False)
    assert worker.flush(5)
    assert worker.is_down and worker.dropped_total == 20
    down = warnings_of(caplog)
    assert len(down) == 1 and "http://test:5000" in down[0] and "connection refused" in down[0]

    up.set()
    time.sleep(0.1)  # past down_retry_s: the next call is tried again
    worker.submit(Op(description="call", fn=send))
    assert worker.flush(5)
    worker.close(5)
    messages = warnings_of(caplog)
    assert len(messages) == 2 and "is back; 20 logging calls were dropped" in messages[1]
    assert sent == [1] and not worker.is_down


def test_permanent_errors_are_not_retried_and_warned_once(caplog):
    calls = []

    def rejected():
        calls.append(1)
        raise Rejected("Changing param values is not allowed. Param 'lr'")

    worker = make_worker()
    for _ in range(3):
        worker.submit(Op(description="log_params", fn=rejected))
    worker.close(5)
    assert len(calls) == 3  # one attempt each
    messages = warnings_of(caplog)
    assert len(messages) == 1 and "Changing param values" in messages[0]
    assert not worker.is_down


def test_consecutive_metric_calls_go_out_in_one_batch():
    gate = threading.Event()
    batches = []
    worker = make_worker(send_metrics=lambda batch: batches.append(list(batch)))
    worker.submit(Op(description="blocker", fn=lambda: gate.wait(5)))
    for step in range(5):
        worker.submit(Op(description="log_metrics", metrics=[("loss", step)]))
    worker.submit(Op(description="tag", fn=lambda: None))
    worker.submit(Op(description="log_metrics", metrics=[("loss", 99)]))
    gate.set()
    worker.close(5)
    assert batches == [[("loss", s) for s in range(5)], [("loss", 99)]]


def test_a_full_queue_drops_without_blocking(caplog):
    gate = threading.Event()
    worker = make_worker(max_queue=2)
    worker.submit(Op(description="blocker", fn=lambda: gate.wait(5)))
    time.sleep(0.05)  # the worker holds the blocker; the queue is empty again
    start = time.perf_counter()
    accepted = [worker.submit(Op(description="x", fn=lambda: None)) for _ in range(6)]
    assert time.perf_counter() - start < 0.1
    assert accepted == [True, True, False, False, False, False]
    assert sum("queue is full" in m for m in warnings_of(caplog)) == 1
    gate.set()
    assert worker.flush(5)
    worker.close(5)


def test_close_gives_up_after_its_timeout(caplog):
    gate = threading.Event()
    ran = []
    worker = make_worker()
    worker.submit(Op(description="hung", fn=lambda: gate.wait(10)))
    worker.submit(Op(description="later", fn=lambda: ran.append(1)))
    start = time.monotonic()
    worker.close(0.2)
    assert time.monotonic() - start < 8
    gate.set()
    time.sleep(0.1)
    assert ran == [] and any("did not finish" in m for m in warnings_of(caplog))
    assert worker.submit(Op(description="after close", fn=lambda: None)) is False


class FakeClient:
    """The slice of MlflowClient the Tracker uses, recording calls."""

    def __init__(self):
        self.metrics, self.params, self.tags, self.artifacts, self.status = [], {}, {}, [], None

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        self.metrics += [(m.key, m.value, m.step) for m in metrics]
        self.params.update({p.key: p.value for p in params})
        self.tags.update({t.key: t.value for t in tags})

    def log_artifact(self, run_id, path, artifact_path=None):
        with open(path, "rb") as f:
            self.artifacts.append((artifact_path, path.rsplit("/", 1)[-1], f.read()))

    def log_artifacts(self, run_id, path, artifact_path=None):
        from pathlib import Path

        for file in sorted(Path(path).rglob("*")):
            if file.is_file():
                self.log_artifact(run_id, str(file), artifact_path)

    def set_terminated(self, run_id, status):
        self.status = status

    def get_run(self, run_id):
        keys = {k for k, _, _ in self.metrics}
        return SimpleNamespace(data=SimpleNamespace(metrics=dict.fromkeys(keys, 0.0)))

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(step=s, value=v) for k, v, s in self.metrics if k == key]


def make_tracker(client, **kwargs) -> Tracker:
    return Tracker(client=client, tracking_uri="fake://", experiment_id="1", run_id="r1", **kwargs)


def test_tracker_logs_through_the_worker(tmp_path):
    client = FakeClient()
    video = tmp_path / "sample.mp4"
    video.write_bytes(b"first")
    with make_tracker(client) as tracker:
        tracker.log_metrics({"train/loss": 0.5}, step=3)
        tracker.log_params({"model": {"width": 8}})
        tracker.log_video(video, step=3)
        video.write_bytes(b"second")  # rewritten by the next evaluation: the logged one stays "first"
        tracker.log_checkpoint(tmp_path / "ckpt", step=3)
        with pytest.raises(FileNotFoundError, match="nope.mp4"):
            tracker.log_video(tmp_path / "nope.mp4")
        with pytest.raises(ValueError, match="expected a video"):
            tracker.log_video(tmp_path / "x.txt")
        with pytest.raises(TypeError, match="train/loss"):
            tracker.log_metrics({"train/loss": "high"})
    assert client.metrics == [("train/loss", 0.5, 3)]
    assert client.params == {"model.width": "8"}
    assert client.tags["checkpoint.latest"] == str((tmp_path / "ckpt").resolve())
    assert client.tags["checkpoint.latest_step"] == "3"
    assert ("samples/step_00000003", "sample.mp4", b"first") in client.artifacts
    assert any(a[0] == "plots" and a[1] == "train_loss.png" for a in client.artifacts)
    assert not any(a[0] and a[0].startswith("checkpoints") for a in client.artifacts)  # upload is opt-in
    assert client.status == "FINISHED"


def test_tracker_end_status_and_checkpoint_upload(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    client = FakeClient()
    with pytest.raises(RuntimeError, match="boom"):
        with make_tracker(client, upload_checkpoints=True) as tracker:
            tracker.log_checkpoint(ckpt, step=10)
            raise RuntimeError("boom")
    assert client.status == "FAILED"
    assert ("checkpoints/step_00000010", "model.safetensors", b"weights") in client.artifacts
    tracker.end("FINISHED")  # already ended: no change
    assert client.status == "FAILED"
    with pytest.raises(ValueError, match="status"):
        make_tracker(FakeClient()).end("DONE")
