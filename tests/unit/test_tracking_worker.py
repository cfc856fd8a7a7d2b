"""The spool (append, recover, rotate, damaged records, lock), sending its records (batching, outages,
rejections) and the Tracker on top of them, with a fake MLflow client: no server, no sleeps beyond a
few hundred ms."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.tracking.send import RecordSender, SendCounts, count_unsent, group_records, send_some
from pipeline.tracking.spool import Position, Spool, SpoolBusyError, find_spools
from pipeline.tracking.tracker import Tracker

RUN = {"run_id": "r1", "tracking_uri": "fake://", "experiment_id": "1"}


class Rejected(Exception):
    error_code = "INVALID_PARAMETER_VALUE"


class FakeClient:
    """The slice of MlflowClient the Tracker uses, recording calls; `down` makes every call fail like a
    server that is away, `reject` names params the server refuses."""

    def __init__(self, *, down: bool = False, reject: tuple[str, ...] = ()):
        self.down, self.reject = down, set(reject)
        self.metrics, self.params, self.tags, self.artifacts, self.statuses = [], {}, {}, [], []
        self.requests = 0

    def _call(self):
        self.requests += 1
        if self.down:
            raise ConnectionError("connection refused")

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        self._call()
        bad = [p.key for p in params if p.key in self.reject]
        if bad:
            raise Rejected(f"Changing param values is not allowed. Param {bad[0]!r}")
        self.metrics += [(m.key, m.value, m.step, m.timestamp) for m in metrics]
        self.params.update({p.key: p.value for p in params})
        self.tags.update({t.key: t.value for t in tags})

    def log_artifact(self, run_id, path, artifact_path=None):
        self._call()
        self.artifacts.append((artifact_path, Path(path).name, Path(path).read_bytes()))

    def log_artifacts(self, run_id, path, artifact_path=None):
        for file in sorted(Path(path).rglob("*")):
            if file.is_file():
                self.log_artifact(run_id, str(file), artifact_path)

    def set_terminated(self, run_id, status, end_time=None):
        self._call()
        self.statuses.append(status)

    def update_run(self, run_id, status=None):
        self._call()
        self.statuses.append(status)

    def get_run(self, run_id):
        keys = {m[0] for m in self.metrics}
        return SimpleNamespace(data=SimpleNamespace(metrics=dict.fromkeys(keys, 0.0)))

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(step=s, value=v) for k, v, s, _ in self.metrics if k == key]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.tracking" and r.levelno >= logging.WARNING]


def metrics_record(step: int, value: float = 1.0, t: int = 1000) -> dict:
    return {"op": "metrics", "t": t + step, "metrics": [["loss", value, step]]}


def make_tracker(client, tmp_path, **kwargs) -> Tracker:
    spool = Spool.open(tmp_path / "spool" / "r1", run=RUN)
    options = {"backoff_s": 0.01, "max_backoff_s": 0.05, "idle_s": 0.05}
    return Tracker(client=client, tracking_uri="fake://", experiment_id="1", run_id="r1", spool=spool,
                   end_grace_s=0.5, worker_options=options, **kwargs)


def test_spool_appends_rotates_and_recovers(tmp_path):
    spool = Spool.open(tmp_path / "r1", run=RUN, segment_bytes=300)
    for step in range(12):
        spool.append(metrics_record(step))
    spool.append({"op": "status", "status": "FAILED", "t": 5})
    assert spool.written.segment > 2  # rotated into several segments, each sealed with a summary
    read = list(spool.read(Position(), limit=100))
    assert [r["seq"] for r, _ in read] == list(range(1, 14))
    spool.mark_sent(read[4][1])
    spool.close()

    again = Spool.open(tmp_path / "r1")  # a resumed run, or `pomvid runs sync`
    assert again.written.seq == 13 and again.sent.seq == 5 and again.pending()
    assert again.recorded_steps == {"loss": 11} and again.last_status == "FAILED"
    assert count_unsent(again) == 8
    assert again.append(metrics_record(12)) == 14
    assert [r["metrics"][0][2] for r, _ in again.read(again.sent, 100) if r["op"] == "metrics"] == list(range(5, 13))
    assert find_spools(tmp_path) == [tmp_path / "r1"]
    again.close()


def test_only_one_process_holds_a_spool(tmp_path):
    spool = Spool.open(tmp_path / "r1", run=RUN)
    with pytest.raises(SpoolBusyError, match="in use by a live process"):
        Spool.open(tmp_path / "r1")
    spool.close()
    Spool.open(tmp_path / "r1").close()
    with pytest.raises(FileNotFoundError, match="not an MLflow spool"):
        Spool.open(tmp_path / "nothing")


def test_a_cut_last_record_and_a_damaged_one_are_skipped_with_a_warning(tmp_path, caplog):
    spool = Spool.open(tmp_path / "r1", run=RUN)
    for step in range(6):
        spool.append(metrics_record(step))
    spool.close()
    log = tmp_path / "r1" / "log-000001.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"loss", b"lost")  # bit rot: the checksum no longer matches
    cut = b'1a2b3c4d {"metrics":[["loss",0.5,6]],"op":"metr'  # a kill in the middle of a write
    log.write_bytes(b"".join(lines) + cut)

    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        spool = Spool.open(tmp_path / "r1")
        assert spool.written.seq == 6 and not log.read_bytes().endswith(cut)  # cut off; appends start clean
        spool.append(metrics_record(7))
        client = FakeClient()
        counts = SendCounts()
        while send_some(spool, RecordSender(client, "r1", spool.folder), counts):
            pass
    assert [m[2] for m in client.metrics] == [0, 1, 3, 4, 5, 7]  # only the damaged and the cut record are gone
    messages = warnings_of(caplog)
    assert any("last record was cut off" in m for m in messages)
    assert any("damaged record" in m for m in messages)
    assert not spool.pending() and spool.corrupt_skipped == 2
    spool.close()


def test_records_are_grouped_within_mlflow_limits():
    records = [metrics_record(s) for s in range(3)] + [{"op": "params", "params": {f"p{i}": "1" for i in range(60)}},
                                                       {"op": "params", "params": {f"q{i}": "1" for i in range(60)}},
                                                       {"op": "status", "status": "FINISHED", "t": 1}]
    pairs = [(dict(r, seq=i + 1), Position(1, i, i + 1)) for i, r in enumerate(records)]
    groups = [[r["op"] for r in group] for group, _ in group_records(pairs)]
    assert groups == [["metrics"] * 3, ["params"], ["params"], ["status"]]  # 120 params > 100 per request


def test_an_outage_keeps_every_call_and_sends_it_in_order_when_back(tmp_path, caplog):
    client = FakeClient(down=True)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        tracker = make_tracker(client, tmp_path)
        tracker.log_params({"lr": 0.1})
        for step in range(20):
            tracker.log_metrics({"loss": float(step)}, step=step)
        tracker.set_tags({"note": "outage"})
        assert not tracker.flush(0.3)  # the server is away: nothing sent, nothing dropped
        assert client.metrics == [] and tracker.worker.is_down
        client.down = False
        assert tracker.flush(10)
        tracker.end()
    assert [(k, v, s) for k, v, s, _ in client.metrics] == [("loss", float(s), s) for s in range(20)]
    timestamps = [t for *_, t in client.metrics]
    assert timestamps == sorted(timestamps)  # the time of each call, not of the late upload
    assert client.params == {"lr": "0.1"} and client.tags["note"] == "outage" and client.statuses == ["FINISHED"]
    messages = warnings_of(caplog)
    assert len(messages) == 2, messages  # one when the outage starts, one when the server is back
    assert "kept in" in messages[0] and "fake://" in messages[0] and "is back" in messages[1]


def test_a_run_ending_during_an_outage_leaves_its_calls_in_the_spool(tmp_path, caplog):
    client = FakeClient(down=True)
    video = tmp_path / "sample.mp4"
    video.write_bytes(b"first")
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        tracker = make_tracker(client, tmp_path)
        for step in range(5):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracker.log_video(video, step=4)
        video.unlink()  # the sampler's file is gone; the spool holds a copy
        tracker.end("FINISHED")
    assert any("pomvid runs sync" in m and "not sent" in m for m in warnings_of(caplog))
    spool = Spool.open(tracker.spool.folder)  # what `pomvid runs sync` does, with the server back
    client.down = False
    counts = SendCounts()
    while send_some(spool, RecordSender(client, "r1", spool.folder), counts):
        pass
    assert [s for _, _, s, _ in client.metrics] == [0, 1, 2, 3, 4]
    assert ("samples/step_00000004", "sample.mp4", b"first") in client.artifacts
    assert client.statuses == ["FINISHED"] and counts.statuses == ["FINISHED"] and counts.metric_values == 5
    assert list((spool.folder / "files").iterdir()) == []  # copies go once the server has them
    before = len(client.metrics)
    assert send_some(spool, RecordSender(client, "r1", spool.folder), SendCounts()) == 0  # nothing twice
    assert len(client.metrics) == before
    spool.close()


def test_a_rejected_param_does_not_take_its_neighbours_along(tmp_path, caplog):
    client = FakeClient(reject=("lr",))
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        with make_tracker(client, tmp_path) as tracker:
            tracker.log_params({"lr": 0.1, "width": 8, "depth": 2})
            tracker.log_metrics({"loss": 0.5}, step=1)
    assert client.params == {"width": "8", "depth": "2"} and client.metrics[0][:3] == ("loss", 0.5, 1)
    assert sum("Changing param values" in m for m in warnings_of(caplog)) == 1


def test_a_resumed_run_does_not_log_re_run_steps_again(tmp_path, caplog):
    client = FakeClient()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        with make_tracker(client, tmp_path, recorded_steps={"loss": 4, "system/cpu": 9}) as tracker:
            for step in (3, 4, 5, 6):  # resumed from the step-2 checkpoint after a kill at step 5
                tracker.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
    assert [s for k, _, s, _ in client.metrics if k == "loss"] == [5, 6]
    assert [s for k, _, s, _ in client.metrics if k == "lr"] == [3, 4, 5, 6]  # keys it never had are kept
    assert sum("not logged again" in m for m in warnings_of(caplog)) == 1


def test_leftovers_of_another_run_are_sent_first(tmp_path):
    other = Spool.open(tmp_path / "spool" / "r0", run=dict(RUN, run_id="r0"))
    other.append(metrics_record(0, value=7.0))
    other.close()
    client = FakeClient()
    leftover = Spool.open(tmp_path / "spool" / "r0")
    with make_tracker(client, tmp_path, leftovers=[(leftover, RecordSender(client, "r0", leftover.folder))]) as tr:
        tr.log_metrics({"loss": 1.0}, step=0)
    assert [m[1] for m in client.metrics] == [7.0, 1.0]
    assert not Spool.open(tmp_path / "spool" / "r0").pending()


def test_tracker_logs_through_the_spool(tmp_path):
    client = FakeClient()
    video = tmp_path / "sample.mp4"
    video.write_bytes(b"first")
    with make_tracker(client, tmp_path) as tracker:
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
    assert [m[:3] for m in client.metrics] == [("train/loss", 0.5, 3)]
    assert client.params == {"model.width": "8"}
    assert client.tags["checkpoint.latest"] == str((tmp_path / "ckpt").resolve())
    assert client.tags["checkpoint.latest_step"] == "3"
    assert ("samples/step_00000003", "sample.mp4", b"first") in client.artifacts
    assert any(a[0] == "plots" and a[1] == "train_loss.png" for a in client.artifacts)
    assert not any(a[0] and a[0].startswith("checkpoints") for a in client.artifacts)  # upload is opt-in
    assert client.statuses == ["FINISHED"]


def test_tracker_end_status_and_checkpoint_upload(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    client = FakeClient()
    with pytest.raises(RuntimeError, match="boom"):
        with make_tracker(client, tmp_path, upload_checkpoints=True) as tracker:
            tracker.log_checkpoint(ckpt, step=10)
            raise RuntimeError("boom")
    assert client.statuses == ["FAILED"]
    assert ("checkpoints/step_00000010", "model.safetensors", b"weights") in client.artifacts
    tracker.end("FINISHED")  # already ended: no change
    assert client.statuses == ["FAILED"]
    with pytest.raises(ValueError, match="status"):
        make_tracker(FakeClient(), tmp_path / "other").end("DONE")


def test_runs_sync_explains_a_folder_without_spool_and_leaves_a_live_run_alone(tmp_path, capsys):
    from pipeline.cli import main as pomvid

    assert pomvid(["runs", "sync", str(tmp_path)]) == 2
    assert "no MLflow spool in" in capsys.readouterr().err
    live = Spool.open(tmp_path / "mlflow_spool" / "r1", run=RUN)  # a run still going holds its spool
    live.append(metrics_record(0))
    assert pomvid(["runs", "sync", str(tmp_path)]) == 1
    assert "in use by a live process" in capsys.readouterr().err
    live.close()
