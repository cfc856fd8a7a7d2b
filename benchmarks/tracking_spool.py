"""What the MLflow spool costs: the trainer's logging call, fsync, reopening a long run's spool, sending.

Rows:
- `log_metrics` of one training step (15 metrics) through a Tracker whose sender is held (nothing is
  sent: the call's own cost, which is all the training loop ever pays), microseconds per call, wall
  time (p50, p99: includes waiting for the CPU on a loaded machine) and the calling thread's CPU time;
- fsync of the spool after a batch of such calls (the background thread pays this once per second);
- reopening a spool of N records (what a resumed run or `pomvid runs sync` does before anything else),
  for growing N: sealed segments are read through their summaries, so the time follows the size of the
  last segment, not the run's length (segments of 1 MiB here to show that in seconds; 32 MiB in use);
- sending N records to an embedded MLflow store (SQLite, the same SQL store a server uses), records
  per second, through the same code path as `pomvid runs sync`.

    python benchmarks/tracking_spool.py
    python benchmarks/tracking_spool.py --records 10000 100000 300000 --send 5000
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

from pipeline.tracking.params import to_metrics
from pipeline.tracking.send import RecordSender, SendCounts, send_some
from pipeline.tracking.spool import Spool
from pipeline.tracking.tracker import Tracker

STEP_METRICS = [f"train/metric_{i:02d}" for i in range(15)]
RUN = {"run_id": "bench", "tracking_uri": "none", "experiment_id": "0"}


class HeldClient:
    """Every MlflowClient call waits until the benchmark ends, then fails like an absent server: the
    Tracker's logging calls are measured alone."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            self.gate.wait()
            raise ConnectionError("benchmark: nothing is sent")

        return call


def bench_log_call(folder: Path, calls: int) -> dict[str, float]:
    spool = Spool.open(folder / "call" / "bench", run=RUN)
    client = HeldClient()
    tracker = Tracker(client=client, tracking_uri="none", experiment_id="0", run_id="bench", spool=spool,
                      plots_at_end=False, flush_timeout=0.1, end_grace_s=0.0)
    steps = [{key: 1.0 / (step + 1) for key in STEP_METRICS} for step in range(calls)]
    seconds = []
    start_cpu = time.thread_time()  # read once: this clock is a slow system call on some VMs
    for step, values in enumerate(steps):
        start = time.perf_counter()
        tracker.log_metrics(values, step=step)
        seconds.append(time.perf_counter() - start)
    cpu = time.thread_time() - start_cpu
    size = spool.written.offset
    start = time.perf_counter()
    spool.sync()
    fsync_s = time.perf_counter() - start
    client.gate.set()
    logging.getLogger("pipeline.tracking").setLevel(logging.ERROR)  # "not sent" is the point here
    tracker.end()
    seconds.sort()
    return {"p50_us": 1e6 * statistics.median(seconds), "p99_us": 1e6 * seconds[int(0.99 * len(seconds))],
            "cpu_us": 1e6 * cpu / calls, "fsync_ms": 1e3 * fsync_s, "bytes_per_call": size / calls}


def bench_queue_baseline(calls: int) -> float:
    """CPU microseconds per call of the tracker before the spool: validate, build MLflow Metric objects,
    put them in an in-memory queue (whose calls were dropped during an outage)."""
    from mlflow.entities import Metric

    pending: queue.Queue = queue.Queue()
    steps = [{key: 1.0 / (step + 1) for key in STEP_METRICS} for step in range(calls)]
    start_cpu = time.thread_time()
    for step, values in enumerate(steps):
        now = int(time.time() * 1000)
        pending.put_nowait([Metric(k, v, now, step) for k, v in to_metrics(values).items()])
    return 1e6 * (time.thread_time() - start_cpu) / calls


def bench_reopen(folder: Path, records: int, segment_bytes: int) -> tuple[float, int]:
    path = folder / f"reopen_{records}" / "bench"
    spool = Spool.open(path, run=RUN, segment_bytes=segment_bytes)
    for step in range(records):
        spool.append({"op": "metrics", "t": step, "metrics": [[key, 0.5, step] for key in STEP_METRICS[:3]]})
    segments = spool.written.segment
    spool.close()
    start = time.perf_counter()
    again = Spool.open(path, segment_bytes=segment_bytes)
    seconds = time.perf_counter() - start
    assert again.written.seq == records
    again.close()
    return seconds, segments


def bench_send(folder: Path, records: int) -> float:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.create_experiment("bench", artifact_location=(folder / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    spool = Spool.open(folder / "send" / run_id, run=dict(RUN, run_id=run_id))
    for step in range(records):
        spool.append({"op": "metrics", "t": step, "metrics": [[key, 0.5, step] for key in STEP_METRICS]})
    start = time.perf_counter()
    sender, counts = RecordSender(client, run_id, spool.folder), SendCounts()
    while send_some(spool, sender, counts):
        pass
    seconds = time.perf_counter() - start
    spool.close()
    return records / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000, help="log_metrics calls timed")
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000, 300_000],
                        help="spool sizes (records) to reopen")
    parser.add_argument("--segment-mib", type=float, default=1.0, help="segment size for the reopen rows")
    parser.add_argument("--send", type=int, default=2_000, help="records (15 metrics each) sent to SQLite; 0: skip")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="pomvid-bench-spool-") as tmp:
        folder = Path(tmp)
        call = bench_log_call(folder, args.calls)
        baseline = bench_queue_baseline(args.calls)
        print("\n| what | result |\n|---|---|")
        print(f"| log_metrics, 15 metrics: wall p50 / p99 | {call['p50_us']:.1f} / {call['p99_us']:.1f} us per call |")
        print(f"| log_metrics, 15 metrics: CPU time of the calling thread | {call['cpu_us']:.1f} us per call |")
        print(f"| the same before the spool (Metric objects into a memory queue) | {baseline:.1f} us per call |")
        print(f"| spool bytes per call | {call['bytes_per_call']:.0f} |")
        print(f"| fsync after {args.calls} calls | {call['fsync_ms']:.1f} ms |")
        segment_bytes = int(args.segment_mib * 1024 * 1024)
        for records in args.records:
            seconds, segments = bench_reopen(folder, records, segment_bytes)
            print(f"| reopen a spool of {records:,} records ({segments} segments of {args.segment_mib:g} MiB) "
                  f"| {1e3 * seconds:.0f} ms |")
        if args.send:
            rate = bench_send(folder, args.send)
            print(f"| send {args.send:,} records of 15 metrics to SQLite | {rate:,.0f} records/s "
                  f"({15 * rate:,.0f} metric values/s) |")


if __name__ == "__main__":
    main()
