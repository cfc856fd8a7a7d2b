"""The Tracker the trainer and the precompute job log through, and its no-op twin for other ranks.

Every logging method returns at once: calls are queued for a background thread (pipeline.tracking.worker)
that retries and, if MLflow stays away, drops them with a warning. Bad arguments (a non-number metric, a
missing file) raise at the call site, since those are bugs in the caller, not outages. `end()` stops
system metrics, plots every metric to `plots/<metric>.png`, flushes the queue and marks the run
terminated.

Files given to `log_artifact` / `log_artifacts` are uploaded from where they are, later: keep them
until `end()` (or `flush()`). `log_video` and `log_dict` snapshot their content at the call.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.tracking.params import PARAMS_PER_BATCH, chunks, to_metrics, to_params, to_plain, to_tags
from pipeline.tracking.plots import plot_metrics
from pipeline.tracking.worker import LogWorker, Op

logger = logging.getLogger("pipeline.tracking")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".mkv")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


class NullTracker:
    """The tracker of ranks other than 0 and of `--tracking off`: every method does nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    enabled = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params, flattened to dotted keys."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numbers at `step` (0 when not given)."""

    def log_metric(self, key: str, value: Any, step: int | None = None) -> None:
        self.log_metrics({key: value}, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values become strings)."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a folder's contents) under `artifact_path`."""

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.log_artifact(path, artifact_path)

    def log_dict(self, data: Any, name: str, artifact_path: str | None = None) -> None:
        """Upload `data` as JSON file `name`."""

    def log_video(self, path: str | Path, *, step: int | None = None, artifact_path: str = "samples") -> None:
        """Upload a sample video (MP4, or a GIF preview) under `samples/[step_XXXXXXXX/]`."""

    def log_deepspeed_config(self, ds_config: Mapping[str, Any]) -> None:
        """Log the DeepSpeed config as `deepspeed.*` params and `deepspeed_config.json`."""

    def log_checkpoint(self, path: str | Path, *, step: int, upload: bool | None = None) -> None:
        """Record a checkpoint's location (tags) and optionally upload it."""

    def log_precompute_summary(self, **summary: Any) -> None:
        """See pipeline.tracking.precompute.log_precompute_summary."""

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def end(self, status: str = "FINISHED") -> None:
        """Finish the run with `status` (FINISHED, FAILED or KILLED)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


class Tracker(NullTracker):
    """Rank 0's live MLflow run; build it with `pipeline.tracking.start_run`."""

    enabled = True

    def __init__(
        self,
        *,
        client: Any,
        tracking_uri: str,
        experiment_id: str,
        run_id: str,
        upload_checkpoints: bool = False,
        plots_at_end: bool = True,
        flush_timeout: float = 120.0,
        worker_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.upload_checkpoints = upload_checkpoints
        self.plots_at_end = plots_at_end
        self.flush_timeout = flush_timeout
        self.system_metrics: Any = None  # a SystemMetricsSampler, set by start_run
        self._staging = Path(tempfile.mkdtemp(prefix="pomvid-mlflow-"))
        self._history: dict[str, list[tuple[int, float]]] = {}
        self._ended = False
        self.worker = LogWorker(
            target=tracking_uri, send_metrics=self._send_metrics, **(worker_options or {})
        )
        atexit.register(self._at_exit)

    # ---- sending (worker thread) --------------------------------------------------------------
    def _send_metrics(self, metrics: list[Any]) -> None:
        for part in chunks(metrics, 1000):
            self.client.log_batch(self.run_id, metrics=list(part), synchronous=True)

    def _submit(self, description: str, fn) -> None:
        self.worker.submit(Op(description=description, fn=fn))

    # ---- logging API ----------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in to_params(params).items()]
        for part in chunks(items, PARAMS_PER_BATCH):
            self._submit(
                f"log_params ({len(part)})",
                lambda p=list(part): self.client.log_batch(self.run_id, params=p, synchronous=True),
            )

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        values = to_metrics(metrics)
        if not values:
            return
        step = int(step or 0)
        now = int(time.time() * 1000)  # the time of the call, not of the (later) upload
        for key, value in values.items():
            if not key.startswith("system/"):  # kept for end-of-run plots, which skip system metrics
                self._history.setdefault(key, []).append((step, value))
        self.worker.submit(
            Op(description="log_metrics", metrics=[Metric(k, v, now, step) for k, v in values.items()])
        )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in to_tags(tags).items()]
        for part in chunks(items, PARAMS_PER_BATCH):
            self._submit(
                f"set_tags ({len(part)})",
                lambda t=list(part): self.client.log_batch(self.run_id, tags=t, synchronous=True),
            )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist; write it before logging it")
        if path.is_dir():
            fn = lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path)  # noqa: E731
        else:
            fn = lambda: self.client.log_artifact(self.run_id, str(path), artifact_path)  # noqa: E731
        self._submit(f"log_artifact {path.name}", fn)

    def _stage(self, name: str) -> Path:
        folder = Path(tempfile.mkdtemp(dir=self._staging))
        return folder / name

    def log_dict(self, data: Any, name: str, artifact_path: str | None = None) -> None:
        target = self._stage(name)
        target.write_text(json.dumps(to_plain(data), indent=2, sort_keys=True, default=str) + "\n")
        self.log_artifact(target, artifact_path)

    def log_video(self, path: str | Path, *, step: int | None = None, artifact_path: str = "samples") -> None:
        path = Path(path)
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"log_video({path}): expected a video file ({', '.join(VIDEO_SUFFIXES)})")
        if not path.is_file():
            raise FileNotFoundError(f"log_video: video {path} does not exist; write it before logging it")
        # Snapshot: samplers often rewrite the same file name at every evaluation.
        copy = self._stage(path.name)
        shutil.copy2(path, copy)
        folder = f"{artifact_path}/step_{int(step):08d}" if step is not None else artifact_path
        self.log_artifact(copy, folder)

    def log_deepspeed_config(self, ds_config: Mapping[str, Any]) -> None:
        self.log_params({"deepspeed": to_plain(ds_config)})
        self.log_dict(ds_config, "deepspeed_config.json")

    def log_checkpoint(self, path: str | Path, *, step: int, upload: bool | None = None) -> None:
        location = str(Path(path).expanduser().resolve())
        self.set_tags(
            {
                "checkpoint.latest": location,
                "checkpoint.latest_step": int(step),
                f"checkpoint.step_{int(step):08d}": location,
            }
        )
        if self.upload_checkpoints if upload is None else upload:
            self.log_artifact(path, f"checkpoints/step_{int(step):08d}")

    def log_precompute_summary(self, **summary: Any) -> None:
        from pipeline.tracking.precompute import log_precompute_summary

        log_precompute_summary(self, **summary)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged so far was sent (or dropped); False if `timeout` ran out."""
        return self.worker.flush(timeout)

    # ---- end ------------------------------------------------------------------------------------
    def _metric_histories(self) -> dict[str, list[tuple[int, float]]]:
        """Full histories from the server (they include earlier segments of a resumed run); this
        process's own values when the server cannot be asked."""
        keys = list(self._history)
        if self.worker.is_down:
            return {k: self._history[k] for k in keys}
        try:
            run = self.client.get_run(self.run_id)
            keys = sorted(k for k in run.data.metrics if not k.startswith("system/"))
            return {
                k: [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, k)] for k in keys
            }
        except Exception as err:  # noqa: BLE001
            logger.warning("could not read metric histories back for plots (%s); plotting local values", err)
            return {k: self._history[k] for k in keys}

    def end(self, status: str = "FINISHED") -> None:
        if self._ended:
            return
        if status not in RUN_STATUSES:
            raise ValueError(f"end(status={status!r}): status must be one of {RUN_STATUSES}")
        self._ended = True
        atexit.unregister(self._at_exit)
        if self.system_metrics is not None:
            self.system_metrics.stop()
        if self.plots_at_end and self._history:
            self.worker.flush(self.flush_timeout)
            try:
                histories = self._metric_histories()
                label = self.run_id[:8]
                paths = plot_metrics({k: {label: v} for k, v in histories.items()}, self._staging / "plots")
                if paths:
                    self.log_artifact(self._staging / "plots", "plots")
            except Exception as err:  # noqa: BLE001 - plots are a nicety; never fail the run over them
                logger.warning("metric plots failed: %s: %s", type(err).__name__, err)
        self._submit(f"set_terminated {status}", lambda: self.client.set_terminated(self.run_id, status))
        self.worker.close(self.flush_timeout)
        if self.worker.dropped_total:
            logger.warning(
                "MLflow run %s at %s: %d logging calls were dropped in total (see earlier warnings)",
                self.run_id,
                self.tracking_uri,
                self.worker.dropped_total,
            )
        shutil.rmtree(self._staging, ignore_errors=True)

    def _at_exit(self) -> None:
        # A forgotten end(): mark the run from how the interpreter is exiting.
        last = getattr(sys, "last_value", None)
        status = "FINISHED" if last is None else "KILLED" if isinstance(last, KeyboardInterrupt) else "FAILED"
        self.end(status)
