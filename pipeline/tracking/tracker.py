"""The Tracker the trainer and the precompute job log through, and its no-op twin for other ranks.

Every logging method writes one record to the run's spool (pipeline.tracking.spool, a local file) and
returns: a background thread (pipeline.tracking.worker) sends the records to MLflow in order and keeps
them while the server is away, so nothing is lost and training never waits on the network. Bad
arguments (a non-number metric, a missing file) raise at the call site, since those are bugs in the
caller, not outages. `end()` stops system metrics, plots every metric to `plots/<metric>.png`, records
the run's status and sends what it can; whatever the server did not take stays in the spool for the
run's next segment or `pomvid runs sync`.

A run resumed from a checkpoint re-runs the steps after it: metric values at steps that earlier
segments of the run already recorded are not logged again, so the MLflow history has each step once.

Files given to `log_artifact` / `log_artifacts` are uploaded from where they are, later: keep them
until `end()`, or pass `snapshot=True` to have them copied into the spool at the call. `log_video` and
`log_dict` always snapshot their content.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.tracking.params import PARAMS_PER_BATCH, chunks, to_metrics, to_params, to_plain, to_tags
from pipeline.tracking.plots import plot_metrics
from pipeline.tracking.send import RecordSender, count_unsent
from pipeline.tracking.spool import Spool
from pipeline.tracking.worker import SpoolWorker

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

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, *, snapshot: bool = False) -> None:
        """Upload a file (or a folder's contents) under `artifact_path`; `snapshot`: copy it now (for
        files that may change or go away before they are sent)."""

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None, *, snapshot: bool = False) -> None:
        self.log_artifact(path, artifact_path, snapshot=snapshot)

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
        spool: Spool,
        recorded_steps: Mapping[str, int] | None = None,
        upload_checkpoints: bool = False,
        plots_at_end: bool = True,
        flush_timeout: float = 120.0,
        end_grace_s: float = 5.0,
        worker_options: Mapping[str, Any] | None = None,
        leftovers: Sequence[tuple[Spool, RecordSender]] = (),
        remove_spool_when_sent: bool = False,
    ) -> None:
        self.client = client
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.spool = spool
        self.upload_checkpoints = upload_checkpoints
        self.plots_at_end = plots_at_end
        self.flush_timeout = flush_timeout
        self.end_grace_s = end_grace_s
        self.system_metrics: Any = None  # a SystemMetricsSampler, set by start_run
        self._recorded = dict(recorded_steps or {})  # metric key -> last step earlier segments recorded
        self._skipped_steps: set[int] = set()
        self._history: dict[str, list[tuple[int, float]]] = {}
        self._ended = False
        self._closed = False
        self._remove_spool_when_sent = remove_spool_when_sent
        spool.start_syncer()
        self.worker = SpoolWorker(spool=spool, sender=RecordSender(client, run_id, spool.folder),
                                  target=tracking_uri, leftovers=leftovers, **(worker_options or {}))
        atexit.register(self._at_exit)

    def _append(self, record: dict[str, Any]) -> None:
        if self._closed:  # a caller logging after end(): a bug, but never one that stops training
            logger.warning("MLflow run %s has ended; %s call after end() ignored", self.run_id, record["op"])
            return
        self.spool.append(record)
        self.worker.wake()

    # ---- logging API ----------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        items = list(to_params(params).items())
        for part in chunks(items, PARAMS_PER_BATCH):
            self._append({"op": "params", "params": dict(part)})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        values = to_metrics(metrics)
        step = int(step or 0)
        if self._recorded:
            kept = {k: v for k, v in values.items() if step > self._recorded.get(k, -1)}
            if len(kept) < len(values):
                self._note_rerun(step)
            values = kept
        if not values:
            return
        now = int(time.time() * 1000)  # the time of the call, not of the (later) upload
        for key, value in values.items():
            if not key.startswith("system/"):  # kept for end-of-run plots, which skip system metrics
                self._history.setdefault(key, []).append((step, value))
        self._append({"op": "metrics", "t": now, "metrics": [[k, v, step] for k, v in values.items()]})

    def _note_rerun(self, step: int) -> None:
        if not self._skipped_steps:
            logger.warning(
                "MLflow run %s continues an earlier segment that recorded metrics up to step %d: values at steps "
                "it already recorded (re-run since the checkpoint) are not logged again",
                self.run_id, max(self._recorded.values()))
        self._skipped_steps.add(step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = list(to_tags(tags).items())
        for part in chunks(items, PARAMS_PER_BATCH):
            self._append({"op": "tags", "tags": dict(part)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, *, snapshot: bool = False) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist; write it before logging it")
        if not snapshot:
            self._append({"op": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path})
            return
        copy = self.spool.snapshot_dir() / path.name
        if path.is_dir():
            shutil.copytree(path, copy)
        else:
            shutil.copy2(path, copy)
        self._append_snapshot(copy, artifact_path)

    def _append_snapshot(self, copy: Path, artifact_path: str | None) -> None:
        self._append({"op": "artifact", "path": copy.relative_to(self.spool.folder).as_posix(), "snapshot": True,
                      "artifact_path": artifact_path})

    def log_dict(self, data: Any, name: str, artifact_path: str | None = None) -> None:
        target = self.spool.snapshot_dir() / name
        target.write_text(json.dumps(to_plain(data), indent=2, sort_keys=True, default=str) + "\n")
        self._append_snapshot(target, artifact_path)

    def log_video(self, path: str | Path, *, step: int | None = None, artifact_path: str = "samples") -> None:
        path = Path(path)
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"log_video({path}): expected a video file ({', '.join(VIDEO_SUFFIXES)})")
        if not path.is_file():
            raise FileNotFoundError(f"log_video: video {path} does not exist; write it before logging it")
        # Snapshot: samplers often rewrite the same file name at every evaluation.
        folder = f"{artifact_path}/step_{int(step):08d}" if step is not None else artifact_path
        self.log_artifact(path, folder, snapshot=True)

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
            # Not copied (checkpoints are large): one pruned before it was sent is reported, not sent.
            self.log_artifact(path, f"checkpoints/step_{int(step):08d}")

    def log_precompute_summary(self, **summary: Any) -> None:
        from pipeline.tracking.precompute import log_precompute_summary

        log_precompute_summary(self, **summary)

    def set_status(self, status: str) -> None:
        """Record a status change ("RUNNING" when a run continues; end() records the final one)."""
        self._append({"op": "status", "status": status, "t": int(time.time() * 1000)})

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged so far was sent; False if `timeout` ran out first."""
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
        grace = self.end_grace_s
        if self.plots_at_end and self._history:
            if not self.worker.flush(self.flush_timeout, down_grace_s=grace):
                grace = 0.0  # the server failed for the whole grace period already: do not wait twice
            try:
                histories = self._metric_histories()
                label = self.run_id[:8]
                folder = self.spool.snapshot_dir() / "plots"
                if plot_metrics({k: {label: v} for k, v in histories.items()}, folder):
                    self._append_snapshot(folder, "plots")
            except Exception as err:  # noqa: BLE001 - plots are a nicety; never fail the run over them
                logger.warning("metric plots failed: %s: %s", type(err).__name__, err)
        self.set_status(status)
        self.spool.sync()
        sent = self.worker.close(self.flush_timeout, grace)
        if not sent:
            logger.warning(
                "MLflow run %s: %d logging calls were not sent to %s (unreachable); they are kept in %s. Send "
                "them with: pomvid runs sync %s", self.run_id, count_unsent(self.spool), self.tracking_uri,
                self.spool.folder, self.spool.folder)
        self._closed = True
        self.spool.close()
        if sent and self._remove_spool_when_sent:
            shutil.rmtree(self.spool.folder.parent, ignore_errors=True)

    def _at_exit(self) -> None:
        # A forgotten end(): mark the run from how the interpreter is exiting.
        last = getattr(sys, "last_value", None)
        status = "FINISHED" if last is None else "KILLED" if isinstance(last, KeyboardInterrupt) else "FAILED"
        self.end(status)
