"""Sending spool records to MLflow, in order: consecutive records of one kind go out in one request.

Errors are of two kinds. The server answered "no" (a changed param, an invalid value, an artifact file
that no longer exists): retrying cannot help, so the record is reported, warned about once per distinct
message and passed over. Anything else (connection refused, timeout, a locked database) means "later":
`send_some` raises and the caller (the background worker, or `pomvid runs sync`) keeps the records
and tries again. Every record carries what MLflow needs to make a second send harmless: metrics their
original timestamp and step, a terminal status its end time.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.tracking.params import METRICS_PER_BATCH, PARAMS_PER_BATCH
from pipeline.tracking.spool import FILES_DIR, Position, Spool

logger = logging.getLogger("pipeline.tracking")

# MLflow error codes that mean "the request itself is wrong": retrying cannot help.
PERMANENT_ERROR_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND",
})
_LIMITS = {"metrics": METRICS_PER_BATCH, "params": PARAMS_PER_BATCH, "tags": PARAMS_PER_BATCH}
_MAX_DISTINCT_WARNINGS = 20


def is_permanent(err: BaseException) -> bool:
    """True when retrying `err` cannot succeed (the server answered and rejected the request)."""
    if isinstance(err, (TypeError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    return getattr(err, "error_code", None) in PERMANENT_ERROR_CODES


@dataclass
class SendCounts:
    """What was sent (for `pomvid runs sync`'s report and the "server is back" message)."""

    records: int = 0
    metric_values: int = 0
    params: int = 0
    tags: int = 0
    artifacts: int = 0
    statuses: list[str] = field(default_factory=list)
    rejected: int = 0

    def describe(self) -> str:
        parts = [f"{self.metric_values} metric values", f"{self.params} params", f"{self.tags} tags",
                 f"{self.artifacts} artifacts"]
        if self.statuses:
            parts.append("status " + " -> ".join(self.statuses))
        if self.rejected:
            parts.append(f"{self.rejected} rejected by the server (see warnings)")
        return ", ".join(parts)


def _size(record: dict[str, Any]) -> int:
    op = record["op"]
    return len(record[op]) if op in _LIMITS else 1


def group_records(pairs: Iterable[tuple[dict[str, Any] | None, Position]]
                  ) -> Iterator[tuple[list[dict[str, Any]], Position]]:
    """(records to send in one request, the position after them): consecutive metrics / params / tags
    records within MLflow's per-request limits; artifacts and statuses alone. Damaged lines (None) only
    move the position on."""
    group: list[dict[str, Any]] = []
    end: Position | None = None
    for record, pos in pairs:
        if record is not None:
            op = record["op"]
            fits = group and op == group[-1]["op"] and op in _LIMITS and \
                sum(map(_size, group)) + _size(record) <= _LIMITS[op]
            if group and not fits:
                yield group, end
                group = []
            group.append(record)
        end = pos
    if end is not None:
        yield group, end


class RecordSender:
    """Turns records of one run into MlflowClient calls."""

    def __init__(self, client: Any, run_id: str, spool_folder: Path) -> None:
        self.client = client
        self.run_id = run_id
        self.spool_folder = spool_folder
        self._warned: set[str] = set()

    def send(self, records: list[dict[str, Any]], counts: SendCounts) -> None:
        """Send one group (see group_records); raises on errors worth retrying."""
        try:
            self._call(records)
        except Exception as err:  # noqa: BLE001 - sorted below
            if not is_permanent(err):
                raise
            if len(records) > 1 or _size(records[0]) > 1:
                for single in _singles(records):  # isolate the rejected entry, send the others
                    self.send([single], counts)
                return
            self._reject(records[0], err, counts)
            return
        _count(records, counts)

    def _call(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        op = records[0]["op"]
        if op == "metrics":
            metrics = [Metric(k, v, r["t"], s) for r in records for k, v, s in r["metrics"]]
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        elif op == "params":
            params = [Param(k, v) for r in records for k, v in r["params"].items()]
            self.client.log_batch(self.run_id, params=params, synchronous=True)
        elif op == "tags":
            tags = [RunTag(k, v) for r in records for k, v in r["tags"].items()]
            self.client.log_batch(self.run_id, tags=tags, synchronous=True)
        elif op == "artifact":
            record = records[0]
            path = self.artifact_path(record)
            if not path.exists():
                raise FileNotFoundError(f"artifact {path} no longer exists (removed before it could be sent)")
            log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
            log(self.run_id, str(path), record.get("artifact_path"))
        elif op == "status":
            record = records[0]
            if record["status"] == "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.client.set_terminated(self.run_id, record["status"], end_time=record["t"])
        else:
            raise ValueError(f"unknown spool record op {op!r} (seq {records[0]['seq']}); written by newer code?")

    def artifact_path(self, record: dict[str, Any]) -> Path:
        """Snapshots are stored relative to the spool folder, so a moved run folder still syncs."""
        return self.spool_folder / record["path"] if record.get("snapshot") else Path(record["path"])

    def _reject(self, record: dict[str, Any], err: BaseException, counts: SendCounts) -> None:
        counts.rejected += 1
        counts.records += 1
        message = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        if message not in self._warned and len(self._warned) < _MAX_DISTINCT_WARNINGS:
            self._warned.add(message)
            logger.warning("MLflow rejected %s of run %s: %s (not retried)", record["op"], self.run_id, message)


def _singles(records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for record in records:
        op = record["op"]
        if op == "params" or op == "tags":
            yield from ({**record, op: {k: v}} for k, v in record[op].items())
        elif op == "metrics":
            yield from ({**record, "metrics": [m]} for m in record["metrics"])
        else:
            yield record


def _count(records: list[dict[str, Any]], counts: SendCounts) -> None:
    for record in records:
        counts.records += 1
        op = record["op"]
        if op == "metrics":
            counts.metric_values += len(record["metrics"])
        elif op in ("params", "tags"):
            setattr(counts, op, getattr(counts, op) + len(record[op]))
        elif op == "artifact":
            counts.artifacts += 1
        elif op == "status":
            counts.statuses.append(record["status"])


def send_some(spool: Spool, sender: RecordSender, counts: SendCounts, *, limit: int = 2000,
              stop: Callable[[], bool] = lambda: False) -> int:
    """Send up to `limit` records after the spool's sent position, marking each group sent; returns how
    many records it passed (0: nothing left). Raises the first error worth retrying."""
    passed = 0
    for group, end in group_records(spool.read(spool.sent, limit)):
        if stop():
            break
        if group:
            sender.send(group, counts)
        if stop():  # closing: the spool may be released already; a later send of these is harmless
            break
        spool.mark_sent(end)
        passed += max(1, len(group))
        for record in group:  # our copy is on the server now
            if record.get("snapshot") and record["path"].startswith(FILES_DIR + "/"):
                shutil.rmtree(spool.folder / Path(record["path"]).parts[0] / Path(record["path"]).parts[1],
                              ignore_errors=True)
    return passed


def count_unsent(spool: Spool) -> int:
    """Records after the sent position (reads them; for reports, not hot paths)."""
    total, pos = 0, spool.sent
    while True:
        batch = list(spool.read(pos, 10_000))
        if not batch:
            return total
        total += sum(record is not None for record, _ in batch)
        pos = batch[-1][1]
