"""A background thread that sends logging calls to MLflow so the trainer never waits on the network.

The trainer puts calls into a bounded queue and returns at once. The thread sends them in order
(consecutive metric calls coalesced into one `log_batch`). When a call fails:

- a permanent error (MLflow rejected the request: e.g. changing a logged param) is dropped at once
  with one warning per distinct message;
- anything else (server gone, timeout, locked database) is retried `attempts` times with backoff. If
  all fail, the call is dropped and the worker is "down": one warning for the whole burst, then one
  attempt per call at most every `down_retry_s` (calls in between are dropped without trying, so the
  queue cannot back up behind a dead server). The first success logs that the server is back and how
  many calls were lost, and normal retries resume.

Nothing here raises into the caller. `flush(timeout)` waits until everything queued so far is sent
or dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.tracking.params import METRICS_PER_BATCH

logger = logging.getLogger("pipeline.tracking")

# MLflow error codes that mean "the request itself is wrong": retrying cannot help.
PERMANENT_ERROR_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "INVALID_STATE",
        "BAD_REQUEST",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "ENDPOINT_NOT_FOUND",
    }
)
_STOP = object()
_MAX_DISTINCT_PERMANENT_WARNINGS = 20


def is_permanent(err: BaseException) -> bool:
    """True when retrying `err` cannot succeed (the server answered and rejected the request)."""
    if isinstance(err, (TypeError, ValueError, FileNotFoundError, IsADirectoryError)):
        return True
    return getattr(err, "error_code", None) in PERMANENT_ERROR_CODES


@dataclass(kw_only=True)
class Op:
    """One queued logging call."""

    description: str
    """What the call does, for warnings ("log_artifact config.json")."""
    fn: Callable[[], Any] | None = None
    """The call itself (None for metric ops, which the worker batches)."""
    metrics: list[Any] | None = None
    """mlflow.entities.Metric objects to send in one log_batch with neighbouring metric ops."""


class LogWorker:
    """Sends queued logging calls to MLflow from a daemon thread; see the module docstring."""

    def __init__(
        self,
        *,
        target: str,
        send_metrics: Callable[[list[Any]], None],
        max_queue: int = 10_000,
        attempts: int = 3,
        backoff_s: float = 0.5,
        down_retry_s: float = 2.0,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.target = target
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.down_retry_s = down_retry_s
        self.dropped_total = 0
        self._send_metrics = send_metrics
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._pending = 0
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._abandon = False
        self._down = False
        self._last_try = 0.0
        self._dropped_burst = 0
        self._queue_full_burst = 0
        self._permanent_seen: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="pomvid-mlflow-logger", daemon=True)
        self._thread.start()

    # ---- caller side -------------------------------------------------------------------------
    def submit(self, op: Op) -> bool:
        """Queue `op` without blocking; False (and a warning once per burst) when the queue is full."""
        if self._abandon:
            return False
        with self._cond:
            self._pending += 1
        try:
            self._queue.put_nowait(op)
        except queue.Full:
            self._done(1)
            self._queue_full_burst += 1
            self.dropped_total += 1
            if self._queue_full_burst == 1:
                logger.warning(
                    "MLflow logging queue is full (%d calls): %s is slower than the trainer; dropping "
                    "logging calls until it catches up (training continues)",
                    self._queue.maxsize,
                    self.target,
                )
            return False
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every call queued so far was sent or dropped; False if `timeout` ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=left)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Flush (up to `timeout`), then stop the thread; calls still queued after that are dropped."""
        if not self.flush(timeout):
            with self._cond:
                left = self._pending
            logger.warning(
                "MLflow logging did not finish within %.0f s; dropping %d queued calls to %s",
                timeout,
                left,
                self.target,
            )
            self._abandon = True
            self._wake.set()
        try:
            self._queue.put(_STOP, timeout=5)
        except queue.Full:
            pass
        # An abandoned thread is stuck in a request: it is a daemon, do not wait for it.
        self._thread.join(timeout=0.5 if self._abandon else 5)

    @property
    def is_down(self) -> bool:
        return self._down

    # ---- worker thread -----------------------------------------------------------------------
    def _done(self, count: int) -> None:
        with self._cond:
            self._pending -= count
            self._cond.notify_all()

    def _loop(self) -> None:
        carry = None
        while True:
            op = carry if carry is not None else self._queue.get()
            carry = None
            if op is _STOP:
                return
            if self._queue.empty():
                self._queue_full_burst = 0
            if op.metrics is None:
                self._execute(op.description, op.fn)
                self._done(1)
                continue
            batch, count = list(op.metrics), 1
            while len(batch) < METRICS_PER_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or nxt.metrics is None:
                    carry = nxt
                    break
                batch.extend(nxt.metrics)
                count += 1
            self._execute(f"log_metrics ({len(batch)} values)", lambda b=batch: self._send_metrics(b))
            self._done(count)

    def _execute(self, description: str, fn: Callable[[], Any]) -> None:
        if self._abandon:
            return
        if self._down and time.monotonic() - self._last_try < self.down_retry_s:
            self._drop()
            return
        attempts = 1 if self._down else self.attempts
        last_err: BaseException | None = None
        for attempt in range(attempts):
            self._last_try = time.monotonic()
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - nothing may escape into training
                if is_permanent(err):
                    self._warn_permanent(description, err)
                    return
                last_err = err
                if attempt + 1 < attempts and not self._abandon:
                    self._wake.wait(self.backoff_s * 2**attempt)
                continue
            self._on_success()
            return
        self._on_failure(description, last_err)

    def _drop(self) -> None:
        self._dropped_burst += 1
        self.dropped_total += 1

    def _on_failure(self, description: str, err: BaseException | None) -> None:
        self._drop()
        if not self._down:
            self._down = True
            logger.warning(
                "MLflow tracking at %s failed (%s: %s) on %s after %d attempts; dropping logging "
                "calls until it is back (training continues)",
                self.target,
                type(err).__name__,
                _first_line(err),
                description,
                self.attempts,
            )

    def _on_success(self) -> None:
        if self._down:
            self._down = False
            logger.warning(
                "MLflow tracking at %s is back; %d logging calls were dropped while it was away",
                self.target,
                self._dropped_burst,
            )
            self._dropped_burst = 0

    def _warn_permanent(self, description: str, err: BaseException) -> None:
        message = _first_line(err)
        if message in self._permanent_seen or len(self._permanent_seen) >= _MAX_DISTINCT_PERMANENT_WARNINGS:
            return
        self._permanent_seen.add(message)
        logger.warning("MLflow rejected %s: %s (not retried)", description, message)


def _first_line(err: BaseException | None) -> str:
    text = str(err) if err is not None else "unknown error"
    return text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
