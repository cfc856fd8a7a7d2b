"""The MLflow record of a precompute job: counts, throughput, failures by reason, and the errors file.

Metrics (all at `step`, default 0, so `runs compare` shows them as final values):
  precompute/<count>              every entry of `counts` (videos, clips, shards, bytes...)
  precompute/<count>_per_s        count / elapsed_s, unless `throughput` is given
  precompute/elapsed_s
  precompute/failures_total       and precompute/failures/<reason> per reason
Artifacts: `precompute_summary.json` (everything above) and the errors file(s) under `errors/`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PREFIX = "precompute/"


def failures_from_errors(errors_path: str | Path) -> dict[str, int]:
    """Count failures by their `reason` field in an errors JSONL file or a folder (and its sub-folders)
    of `*.jsonl` files.

    Lines without a reason count as "unknown"; lines that are not JSON raise a ValueError naming the
    file and line, since the errors file is written by our own pipeline and must stay readable.
    """
    path = Path(errors_path)
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]  # errors/<ab>/<unit>.jsonl
    reasons: Counter[str] = Counter()
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{file}:{number}: not a JSON line ({err.msg}); the errors file is damaged"
                ) from err
            reasons[str(record.get("reason") or "unknown")] += 1
    return dict(reasons)


def precompute_metrics(
    *,
    counts: Mapping[str, float],
    elapsed_s: float | None = None,
    failures_by_reason: Mapping[str, int] | None = None,
    throughput: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The metric dict described in the module docstring (pure; no MLflow)."""
    metrics = {f"{PREFIX}{name}": float(value) for name, value in counts.items()}
    if throughput is not None:
        metrics.update({f"{PREFIX}{name}": float(value) for name, value in throughput.items()})
    elif elapsed_s:
        metrics.update({f"{PREFIX}{name}_per_s": float(value) / elapsed_s for name, value in counts.items()})
    if elapsed_s is not None:
        metrics[f"{PREFIX}elapsed_s"] = float(elapsed_s)
    if failures_by_reason is not None:
        metrics[f"{PREFIX}failures_total"] = float(sum(failures_by_reason.values()))
        metrics.update({f"{PREFIX}failures/{reason}": float(n) for reason, n in failures_by_reason.items()})
    return metrics


def log_precompute_summary(
    tracker: Any,
    *,
    counts: Mapping[str, float],
    elapsed_s: float | None = None,
    failures_by_reason: Mapping[str, int] | None = None,
    throughput: Mapping[str, float] | None = None,
    errors_path: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
    step: int = 0,
) -> dict[str, Any]:
    """Log a precompute job's summary to `tracker` (a no-op on a NullTracker) and return it.

    `failures_by_reason` defaults to the reasons counted in `errors_path` when that exists. `extra`
    (e.g. the manifest's fingerprints) goes into the summary JSON only.
    """
    if elapsed_s is not None and elapsed_s < 0:
        raise ValueError(f"elapsed_s must be >= 0 seconds, got {elapsed_s}")
    errors = Path(errors_path) if errors_path is not None else None
    if failures_by_reason is None and errors is not None and errors.exists():
        failures_by_reason = failures_from_errors(errors)
    metrics = precompute_metrics(
        counts=counts, elapsed_s=elapsed_s, failures_by_reason=failures_by_reason, throughput=throughput
    )
    summary = {
        "counts": dict(counts),
        "elapsed_s": elapsed_s,
        "failures_by_reason": dict(failures_by_reason or {}),
        "metrics": metrics,
        "errors_path": str(errors) if errors is not None else None,
        **dict(extra or {}),
    }
    tracker.log_metrics(metrics, step=step)
    tracker.set_tags(
        {"precompute.failures_by_reason": json.dumps(summary["failures_by_reason"], sort_keys=True)}
    )
    tracker.log_dict(summary, "precompute_summary.json")
    if errors is not None and errors.exists():
        tracker.log_artifact(errors, "errors", snapshot=True)  # a later job of the folder appends to it
    return summary
