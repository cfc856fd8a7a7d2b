"""`pomvid runs sync RUN_DIR`: send what runs left unsent in their spools, later and idempotently.

A run whose server was down until it ended, or whose process was killed, keeps its unsent logging calls
in `<output_dir>/mlflow_spool/<run_id>/`. Syncing sends them in order with their original steps and
timestamps and moves the spool's sent position, so a second sync sends nothing. A spool a live process
holds (the run is still going, or another sync) is left to that process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.tracking.send import RecordSender, SendCounts, count_unsent, send_some
from pipeline.tracking.spool import Spool, SpoolBusyError, find_spools
from pipeline.tracking.uri import TrackingError, configure_http_env, is_http

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


@dataclass(kw_only=True)
class SyncResult:
    """What one spool's sync did."""

    folder: Path
    run_id: str
    tracking_uri: str
    counts: SendCounts = field(default_factory=SendCounts)
    """What was sent now."""
    left: int = 0
    """Records still unsent (the server failed `attempts` times in a row)."""
    problem: str | None = None
    """Why nothing or not everything was sent (busy spool, unknown run, unreachable server)."""
    last_status: str | None = None
    """The last status the spool holds (None or RUNNING: the run's process was killed)."""
    corrupt_skipped: int = 0

    @property
    def ok(self) -> bool:
        return self.problem is None and self.left == 0

    def describe(self) -> str:
        head = f"run {self.run_id} -> {self.tracking_uri}"
        if self.problem is not None:
            text = f"{head}: {self.problem}"
        elif self.counts.records == 0:
            text = f"{head}: nothing to send (every record was sent before)"
        else:
            text = f"{head}: sent {self.counts.records} records ({self.counts.describe()})"
        if self.left:
            text += f"; {self.left} records still unsent, run this again when the server is reachable"
        if self.corrupt_skipped:
            text += f"; {self.corrupt_skipped} damaged records skipped (see warnings)"
        if self.problem is None and self.last_status not in TERMINAL_STATUSES:
            text += "; the run has no end status (its process was killed): MLflow shows it RUNNING until it is resumed"
        return text


def sync_runs(path: str | Path, tracking_uri: str | None = None, *, attempts: int = 4,
              backoff_s: float = 1.0) -> list[SyncResult]:
    """Sync every spool of `path` (a run's output folder, its mlflow_spool/ or one spool folder).

    `tracking_uri` overrides the URI each spool recorded (the server moved). A server that fails
    `attempts` times in a row leaves the rest for the next sync. Raises TrackingError when `path`
    holds no spool.
    """
    folders = find_spools(path)
    if not folders:
        raise TrackingError(
            f"no MLflow spool in {path}: expected a run's output folder with mlflow_spool/<run_id>/run.json "
            "(written by training and precompute jobs), its mlflow_spool/ folder or one spool folder"
        )
    return [_sync_one(folder, tracking_uri, attempts=attempts, backoff_s=backoff_s) for folder in folders]


def _sync_one(folder: Path, tracking_uri: str | None, *, attempts: int, backoff_s: float) -> SyncResult:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        spool = Spool.open(folder)
    except SpoolBusyError as err:
        return SyncResult(folder=folder, run_id=folder.name, tracking_uri=tracking_uri or "?",
                          problem=f"{err}: that process sends the run's records itself")
    try:
        run_id = spool.info["run_id"]
        uri = tracking_uri or spool.info["tracking_uri"]
        result = SyncResult(folder=folder, run_id=run_id, tracking_uri=uri, last_status=spool.last_status)
        if not spool.pending():
            result.corrupt_skipped = spool.corrupt_skipped
            return result
        if is_http(uri):
            configure_http_env()
        client = MlflowClient(tracking_uri=uri)
        sender = RecordSender(client, run_id, folder)
        failures, checked, last_error = 0, False, ""
        while True:
            try:
                if not checked:  # the run must exist there: never spend the spool on rejections
                    client.get_run(run_id)
                    checked = True
                if send_some(spool, sender, result.counts) == 0:
                    break
                failures = 0
                continue
            except MlflowException as err:
                if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                    result.problem = (f"run {run_id} does not exist at {uri}; pass the --tracking-uri it was logged "
                                      f"to (its spool says {spool.info['tracking_uri']})")
                    break
                failures, last_error = failures + 1, _first_line(err)
            except Exception as err:  # noqa: BLE001 - unreachable, timeouts: retried, then reported
                failures, last_error = failures + 1, _first_line(err)
            if failures >= attempts:
                result.problem = f"{uri} did not take the records ({attempts} attempts; last error: {last_error})"
                break
            time.sleep(backoff_s * 2 ** (failures - 1))
        result.left = count_unsent(spool)
        result.corrupt_skipped = spool.corrupt_skipped
        return result
    finally:
        spool.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__
