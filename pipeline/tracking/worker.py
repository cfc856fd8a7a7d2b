"""The background thread that sends a run's spool to MLflow, so the trainer never waits on the network.

Logging calls only append to the spool (pipeline.tracking.spool) and wake this thread. It sends the
records after the spool's sent position in order (pipeline.tracking.send) and marks them sent. When
the server is away it keeps them and tries again with backoff (`backoff_s` doubling up to
`max_backoff_s`), with one warning when the outage starts and one when the server is back. Nothing is
dropped: what is still unsent when the run ends stays in the spool, for the run's next segment or
`pomvid runs sync`. Leftovers of other runs in the same spool root (an earlier precompute job of the
same folder, ...) are sent first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from pipeline.tracking.send import RecordSender, SendCounts, send_some
from pipeline.tracking.spool import Spool

logger = logging.getLogger("pipeline.tracking")


class SpoolWorker:
    """Sends `spool` through `sender` from a daemon thread; see the module docstring."""

    def __init__(self, *, spool: Spool, sender: RecordSender, target: str, backoff_s: float = 0.5,
                 max_backoff_s: float = 10.0, idle_s: float = 1.0,
                 leftovers: Sequence[tuple[Spool, RecordSender]] = ()) -> None:
        if backoff_s <= 0 or max_backoff_s < backoff_s:
            raise ValueError(f"need 0 < backoff_s <= max_backoff_s, got {backoff_s} and {max_backoff_s}")
        self.spool, self.sender, self.target = spool, sender, target
        self.backoff_s, self.max_backoff_s, self.idle_s = backoff_s, max_backoff_s, idle_s
        self.leftovers = list(leftovers)
        self.counts = SendCounts()
        self.down_since: float | None = None
        self._cond = threading.Condition()
        self._wake = threading.Event()    # something was appended: ends an idle wait
        self._urgent = threading.Event()  # flush / close: also ends a backoff wait
        self._stop = False
        self._finished = False
        self._thread = threading.Thread(target=self._loop, name="pomvid-mlflow-sender", daemon=True)
        self._thread.start()

    # ---- caller side -------------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    @property
    def is_down(self) -> bool:
        return self.down_since is not None

    def flush(self, timeout: float | None = None, down_grace_s: float | None = None) -> bool:
        """Wait until everything appended so far is sent; False when `timeout` ran out first (or, with
        `down_grace_s`, once the server has been failing that long)."""
        return self._wait_sent(timeout, down_grace_s=down_grace_s)

    def close(self, timeout: float, down_grace_s: float) -> bool:
        """Send what is left, for up to `timeout` s, or `down_grace_s` s while the server keeps failing;
        then stop the thread. True when everything was sent."""
        done = self._wait_sent(timeout, down_grace_s=down_grace_s)
        self._stop = True
        self._wake.set()
        self._urgent.set()
        self._thread.join(timeout=5)  # a thread stuck in a request is a daemon: do not wait for it
        return done

    def _wait_sent(self, timeout: float | None, *, down_grace_s: float | None) -> bool:
        target = self.spool.written
        start = time.monotonic()
        self._wake.set()
        self._urgent.set()  # retry now instead of at the end of a backoff
        with self._cond:
            while self.spool.sent < target and not self._finished:
                now = time.monotonic()
                if timeout is not None and now - start >= timeout:
                    return False
                if down_grace_s is not None and self.down_since is not None and \
                        now - max(self.down_since, start) >= down_grace_s:
                    return False
                self._cond.wait(0.1)
        return self.spool.sent >= target

    # ---- worker thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            for spool, sender in self.leftovers:
                try:
                    self._drain(spool, sender, SendCounts(), leftover=True)
                finally:
                    spool.close()
            self._drain(self.spool, self.sender, self.counts, leftover=False)
        except Exception as err:  # noqa: BLE001 - a bug here must not reach training; records stay spooled
            logger.warning("MLflow sender stopped (%s: %s); unsent records stay in %s (pomvid runs sync)",
                           type(err).__name__, err, self.spool.folder)
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _drain(self, spool: Spool, sender: RecordSender, counts: SendCounts, *, leftover: bool) -> None:
        backoff = self.backoff_s
        stopping = lambda: self._stop  # noqa: E731
        while not self._stop:
            self._wake.clear()
            self._urgent.clear()
            try:
                passed = send_some(spool, sender, counts, stop=stopping)
            except Exception as err:  # noqa: BLE001 - send_some raises only errors worth retrying
                self._on_failure(err, spool)
                self._urgent.wait(backoff)
                backoff = min(2 * backoff, self.max_backoff_s)
                continue
            backoff = self.backoff_s
            self._on_success()
            with self._cond:
                self._cond.notify_all()
            if passed == 0:
                if leftover:
                    return
                self._wake.wait(self.idle_s)

    def _on_failure(self, err: BaseException, spool: Spool) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            logger.warning(
                "MLflow tracking at %s failed (%s: %s); logging calls are kept in %s and sent in order when it "
                "is back (training continues)", self.target, type(err).__name__, first, spool.folder)

    def _on_success(self) -> None:
        if self.down_since is not None:
            logger.warning("MLflow tracking at %s is back after %.0f s; the logging calls kept meanwhile are sent "
                           "in order", self.target, time.monotonic() - self.down_since)
            self.down_since = None
