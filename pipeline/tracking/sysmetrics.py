"""MLflow's system metrics (CPU, memory, disk, network, GPU as `system/...`) through our logging queue.

MLflow's own `SystemMetricsMonitor` thread stops for good at the first failed request and asks the
server for the run's status at every sample, so a server restart ends system metrics for the rest of
a training run. We keep MLflow's collectors (same metric names as `log_system_metrics=True`, shown in
the UI's system metrics tab) and replace the loop: samples go through the same retrying, bounded
queue as the trainer's metrics, and sampling survives an outage.

Sampling interval: MLflow's default of 10 s leaves a 20 s test or smoke run with one point or none.
We sample every `interval` seconds (default 5), average `samples_per_log` samples per logged point,
and always log a last point when the run ends, so even a short run has system metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("pipeline.tracking")
PREFIX = "system/"


def _collectors() -> list[Any]:
    """MLflow's metric collectors for this machine (GPU ones only where a GPU library answers)."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    collectors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for module, name in (
        ("mlflow.system_metrics.metrics.gpu_monitor", "GPUMonitor"),
        ("mlflow.system_metrics.metrics.rocm_monitor", "ROCMMonitor"),
    ):
        try:
            cls = getattr(__import__(module, fromlist=[name]), name)
            collectors.append(cls())
            break
        except Exception:  # noqa: BLE001 - no GPU library or no GPU: CPU metrics only
            continue
    return collectors


class SystemMetricsSampler:
    """Samples system metrics in a daemon thread and hands them to `emit(metrics, step)`."""

    def __init__(
        self,
        emit: Callable[[dict[str, float], int], None],
        *,
        interval: float = 5.0,
        samples_per_log: int = 1,
        first_step: int = 0,
        node_id: str | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"system metrics interval must be > 0 seconds, got {interval}")
        if samples_per_log < 1:
            raise ValueError(f"samples_per_log must be >= 1, got {samples_per_log}")
        self.interval = interval
        self.samples_per_log = samples_per_log
        self.step = first_step
        self._emit = emit
        self._prefix = PREFIX + (f"{node_id}/" if node_id else "")
        self._collectors = _collectors()
        self._samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pomvid-system-metrics", daemon=True)

    def start(self) -> SystemMetricsSampler:
        self._thread.start()
        return self

    def _collect(self) -> None:
        with self._lock:
            for collector in self._collectors:
                collector.collect_metrics()
            self._samples += 1

    def _publish(self) -> None:
        with self._lock:
            if self._samples == 0:
                return
            metrics: dict[str, float] = {}
            for collector in self._collectors:
                metrics.update(collector.aggregate_metrics())
                collector.clear_metrics()
            self._samples = 0
            step, self.step = self.step, self.step + 1
        self._emit({self._prefix + k: float(v) for k, v in metrics.items()}, step)

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self._collect()
                if self._samples >= self.samples_per_log:
                    self._publish()
        except Exception as err:  # noqa: BLE001 - a collector bug must not kill tracking
            logger.warning("system metrics sampling stopped: %s: %s", type(err).__name__, err)

    def stop(self) -> None:
        """Stop sampling and log a last point (so runs shorter than `interval` still get one)."""
        self._stop.set()
        self._thread.join(timeout=max(5.0, 2 * self.interval))
        try:
            self._collect()
            self._publish()
        except Exception as err:  # noqa: BLE001
            logger.warning("last system metrics sample failed: %s: %s", type(err).__name__, err)
