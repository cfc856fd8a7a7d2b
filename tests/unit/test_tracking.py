"""pipeline.tracking without a server: params, URIs, ranks, environment tags, CLI options, precompute
summaries, system metrics sampling and plots."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.tracking import (
    NullTracker,
    TrackingError,
    TrackingUnreachableError,
    add_tracking_args,
    check_reachable,
    default_run_name,
    flatten_config,
    rank_from_env,
    resolve_tracking_uri,
    start_run,
    to_params,
    tracking_kwargs,
)
from pipeline.tracking.env import environment_tags
from pipeline.tracking.params import KEY_LIMIT, PARAM_VALUE_LIMIT, chunks, sanitize_key, to_metrics
from pipeline.tracking.plots import plot_metrics
from pipeline.tracking.precompute import failures_from_errors, precompute_metrics
from pipeline.tracking.sysmetrics import SystemMetricsSampler

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port nothing listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mode(enum.Enum):
    FAST = "fast"


@dataclasses.dataclass(kw_only=True)
class Model:
    width: int = 8
    mode: Mode = Mode.FAST


def test_flatten_config_nests_dataclasses_and_keeps_lists_whole():
    flat = flatten_config(
        {
            "model": Model(),
            "deepspeed": {"zero_optimization": {"stage": 2}},
            "buckets": [(17, 32, 32)],
            "x": {},
        }
    )
    assert flat == {
        "model.width": 8,
        "model.mode": "fast",
        "deepspeed.zero_optimization.stage": 2,
        "buckets": [[17, 32, 32]],
        "x": {},
    }
    with pytest.raises(TypeError, match="mapping or a dataclass"):
        flatten_config([1, 2])


def test_params_are_strings_within_mlflow_limits():
    params = to_params(
        {"long": "y" * 5000, "lst": [1, "a"], "path": Path("/a/b"), "np": np.float32(0.5), "bad key!": 1}
    )
    assert len(params["long"]) == PARAM_VALUE_LIMIT and params["long"].endswith("...[truncated]")
    assert params["lst"] == '[1, "a"]' and params["path"] == "/a/b" and params["np"] == "0.5"
    assert params["bad key_"] == "1"
    long_a, long_b = sanitize_key("k" * 400 + "a"), sanitize_key("k" * 400 + "b")
    assert len(long_a) <= KEY_LIMIT and long_a != long_b
    assert sanitize_key("a/../b") == "a/./b"
    assert [len(c) for c in chunks(list(range(250)), 100)] == [100, 100, 50]


def test_metrics_must_be_numbers():
    assert to_metrics({"loss": np.float64(0.25), "step_time": 3}) == {"loss": 0.25, "step_time": 3.0}
    with pytest.raises(TypeError, match="'loss'"):
        to_metrics({"loss": np.zeros(3)})


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://env:5000"
    assert resolve_tracking_uri("http://arg:5000", tmp_path) == "http://arg:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(TrackingError, match="output_dir"):
        resolve_tracking_uri(None, None)


def test_only_rank_zero_gets_a_live_tracker(monkeypatch):
    # A URI nothing listens on: a live tracker would fail, a NullTracker never connects.
    uri = f"http://127.0.0.1:{free_port()}"
    assert not start_run(config={}, tracking_uri=uri, rank=1).enabled
    assert not start_run(config={}, tracking_uri=uri, rank=0, enabled=False).enabled
    monkeypatch.setenv("RANK", "3")
    assert rank_from_env() == 3
    tracker = start_run(config={}, tracking_uri=uri)
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    with tracker:  # every method is a no-op
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_video("missing.mp4")
        tracker.log_checkpoint("ckpt", step=1)
        tracker.log_precompute_summary(counts={"videos": 1})
        assert tracker.flush(1)
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(TrackingError, match="RANK='zero'"):
        rank_from_env()


def test_unreachable_server_is_detected_within_seconds():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnreachableError) as info:
        check_reachable(uri)
    assert time.monotonic() - start < 5
    assert uri in str(info.value) and "--tracking off" in str(info.value)
    check_reachable("sqlite:///nowhere/mlflow.db")  # local stores are not probed


def test_default_run_name_uses_recipe_and_time():
    assert default_run_name({"recipe": "tiny"}, now=0).startswith("tiny-19")
    assert default_run_name({}, now=0).startswith("run-")


def test_environment_tags_do_not_import_heavy_packages():
    code = (
        "import sys, json\n"
        "from pipeline.tracking.env import environment_tags\n"
        "tags = environment_tags()\n"
        "print(json.dumps({'tags': tags, 'torch': 'torch' in sys.modules, 'ray': 'ray' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert not result["torch"] and not result["ray"]
    tags = result["tags"]
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert {"host", "version.pomvid", "version.mlflow", "version.python"} <= set(tags)
    assert environment_tags(repo="/")["host"]  # outside git: no git tags, no error


def test_tracking_cli_options():
    parser = argparse.ArgumentParser()
    add_tracking_args(parser)
    kwargs = tracking_kwargs(parser.parse_args(["--tracking", "off", "--tracking-uri", "http://h:1"]))
    assert kwargs == {
        "enabled": False,
        "tracking_uri": "http://h:1",
        "experiment": "pomvid",
        "run_name": None,
        "upload_checkpoints": False,
    }
    assert tracking_kwargs(parser.parse_args(["--upload-checkpoints"]))["upload_checkpoints"]


def test_precompute_summary_metrics(tmp_path):
    errors = tmp_path / "errors"
    errors.mkdir()
    (errors / "part-0.jsonl").write_text('{"reason": "corrupt"}\n\n{"reason": "corrupt"}\n')
    (errors / "part-1.jsonl").write_text('{"reason": "too_short"}\n{"path": "x"}\n')
    reasons = failures_from_errors(errors)
    assert reasons == {"corrupt": 2, "too_short": 1, "unknown": 1}
    metrics = precompute_metrics(
        counts={"videos": 10, "clips": 20}, elapsed_s=5.0, failures_by_reason=reasons
    )
    assert metrics["precompute/clips_per_s"] == 4.0 and metrics["precompute/failures_total"] == 4
    assert metrics["precompute/failures/corrupt"] == 2 and metrics["precompute/elapsed_s"] == 5.0
    (errors / "part-2.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="part-2.jsonl:1"):
        failures_from_errors(errors)


def test_system_metrics_sampler_emits_mlflow_system_metrics():
    emitted: list[tuple[dict, int]] = []
    sampler = SystemMetricsSampler(lambda m, s: emitted.append((m, s)), interval=0.05, first_step=7).start()
    time.sleep(0.4)
    sampler.stop()
    assert len(emitted) >= 2
    assert [s for _, s in emitted] == list(range(7, 7 + len(emitted)))
    assert "system/cpu_utilization_percentage" in emitted[0][0]
    # A run shorter than one interval still gets its final sample.
    short: list = []
    SystemMetricsSampler(lambda m, s: short.append(s), interval=60).start().stop()
    assert short == [0]
    with pytest.raises(ValueError, match="interval"):
        SystemMetricsSampler(lambda m, s: None, interval=0)


def test_plots_are_valid_pngs_one_per_metric(tmp_path):
    paths = plot_metrics(
        {
            "train/loss": {"a": [(0, 1.0), (1, 0.5)], "b": [(0, 2.0)]},
            "train_loss": {"a": [(0, 1.0)]},  # same file name once sanitized: kept apart
        },
        tmp_path,
    )
    assert sorted(p.name for p in paths.values()) == ["train_loss.png", "train_loss_2.png"]
    for path in paths.values():
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_mlflow_http_retries_are_bounded_unless_the_user_set_them(monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TrackingUnreachableError):
        start_run(config={}, tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # bounded by our own retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    with pytest.raises(TrackingUnreachableError):
        start_run(config={}, tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # a user's own setting wins
