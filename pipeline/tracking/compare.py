"""Reading runs back for `pomvid runs list` and `pomvid runs compare` (local SQLite store or a server).

Comparison rules, stated in the output so nobody has to guess:
- "best" is the minimum for loss-like metrics and the maximum for throughput / quality metrics
  (names matching THROUGHPUT or HIGHER_IS_BETTER below); `--maximize` / `--minimize` override.
- "final" is the value at the largest step (the last one logged at that step).
- throughput metrics also get their mean over the run.
- params are shown when they differ between the compared runs (a param missing in a run counts as a
  difference and shows as "-").
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.tracking.uri import (
    LOCAL_DB_NAME,
    TrackingError,
    check_reachable,
    configure_http_env,
    is_http,
    local_store_uri,
    sqlite_path,
)

THROUGHPUT = re.compile(r"(per_s(ec)?\b|/s$|throughput|tflops|mfu)", re.I)
HIGHER_IS_BETTER = re.compile(r"(acc(uracy)?|psnr|ssim|clip_score|precision|recall|f1)", re.I)
# Names that say "time" are durations even when they contain a THROUGHPUT word (throughput_time_s).
DURATION = re.compile(r"(time|elapsed|latency|duration)", re.I)
MISSING = "-"
# Eval results (pipeline/eval/log.py): `eval/<name>` belongs to the protocol in the run's param
# eval.protocol; `eval/<protocol id>/<name>` to that id. The protocol itself is the tag eval.protocol.<id>.
PROTOCOL_PARAM = "eval.protocol"
PROTOCOL_TAG_PREFIX = "eval.protocol."
_PROTOCOL_ID = re.compile(r"^[0-9a-f]{8}$")


def is_throughput(metric: str) -> bool:
    return bool(THROUGHPUT.search(metric)) and not DURATION.search(metric)


def direction(metric: str, maximize: Iterable[str] = (), minimize: Iterable[str] = ()) -> str:
    """ "max" or "min": which extreme of `metric` is best (see the module docstring)."""
    if metric in set(maximize):
        return "max"
    if metric in set(minimize):
        return "min"
    return "max" if is_throughput(metric) or HIGHER_IS_BETTER.search(metric) else "min"


def summarize(points: Sequence[tuple[int, float]], best: str, with_mean: bool = False) -> dict[str, Any]:
    """{"final", "final_step", "best", "best_step"[, "mean"]} of [(step, value), ...] (in logging order)."""
    if not points:
        return {}
    final_step = max(step for step, _ in points)
    final = [value for step, value in points if step == final_step][-1]
    pick = min if best == "min" else max
    best_step, best_value = pick(points, key=lambda p: p[1])
    out = {"final": final, "final_step": final_step, "best": best_value, "best_step": best_step}
    if with_mean:
        out["mean"] = sum(v for _, v in points) / len(points)
    return out


def open_store(
    tracking_uri: str | None = None, output_dir: str | os.PathLike | None = None
) -> tuple[Any, str]:
    """(MlflowClient, uri): `--tracking-uri`, else `--output-dir`'s mlflow.db, else MLFLOW_TRACKING_URI.

    A missing SQLite file is an error here: MLflow would silently create an empty store instead.
    """
    from mlflow import MlflowClient

    if tracking_uri is None and output_dir is not None:
        db = Path(output_dir) / LOCAL_DB_NAME
        if not db.is_file():
            found = sorted(str(p) for p in Path(output_dir).glob(f"*/{LOCAL_DB_NAME}"))[:10]
            hint = f"; stores found below it: {', '.join(found)}" if found else ""
            raise TrackingError(f"no MLflow store at {db} (pass the --output-dir of a run){hint}")
        tracking_uri = local_store_uri(output_dir)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingError(
            "which runs? pass --tracking-uri URI or --output-dir DIR (or set MLFLOW_TRACKING_URI)"
        )
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"no MLflow store at {db} (from tracking URI {uri})")
    if is_http(uri):
        configure_http_env()
        check_reachable(uri)
    return MlflowClient(tracking_uri=uri), uri


def find_experiment(client: Any, name: str, uri: str) -> Any:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments(max_results=100))
        raise TrackingError(
            f"no experiment {name!r} at {uri}; experiments there: {', '.join(names) or '(none)'}"
        )
    return experiment


def search_runs(client: Any, experiment_id: str, max_results: int = 200) -> list[Any]:
    """Runs of the experiment, newest first."""
    return list(
        client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=max_results)
    )


def select_runs(runs: Sequence[Any], wanted: Sequence[str] | None) -> list[Any]:
    """The runs named in `wanted` (full id, id prefix of 6+ characters, or run name), in that order."""
    if not wanted:
        return list(runs)
    chosen, unknown = [], []
    for key in wanted:
        match = [
            r
            for r in runs
            if r.info.run_id == key
            or (len(key) >= 6 and r.info.run_id.startswith(key))
            or r.info.run_name == key
        ]
        if not match:
            unknown.append(key)
        chosen.extend(r for r in match if r not in chosen)
    if unknown:
        raise TrackingError(
            f"runs not found in the experiment: {', '.join(unknown)}; use `pomvid runs list` for ids and names"
        )
    return chosen


def run_labels(runs: Sequence[Any]) -> list[str]:
    """Column labels: the run name, with an id prefix where names repeat."""
    names = [r.info.run_name or r.info.run_id[:8] for r in runs]
    return [f"{n}#{r.info.run_id[:6]}" if names.count(n) > 1 else n for n, r in zip(names, runs)]


def duration_s(run: Any, now_ms: float | None = None) -> float | None:
    start, end = run.info.start_time, run.info.end_time
    if start is None:
        return None
    end = end or (now_ms if now_ms is not None else time.time() * 1000)
    return max(0.0, (end - start) / 1000)


def differing_params(runs: Sequence[Any]) -> dict[str, list[str]]:
    """{param: [value per run]} for the params whose values are not all equal across `runs`."""
    keys = sorted(set().union(*(r.data.params for r in runs))) if runs else []
    out = {}
    for key in keys:
        values = [r.data.params.get(key, MISSING) for r in runs]
        if len(set(values)) > 1:
            out[key] = values
    return out


def metric_names(runs: Sequence[Any], include_system: bool = False) -> list[str]:
    names = set().union(*(r.data.metrics for r in runs)) if runs else set()
    return sorted(n for n in names if include_system or not n.startswith("system/"))


def histories(client: Any, runs: Sequence[Any], metric: str) -> list[list[tuple[int, float]]]:
    """Full (step, value) history of `metric` for each run ([] where a run lacks it)."""
    out = []
    for run in runs:
        if metric not in run.data.metrics:
            out.append([])
            continue
        out.append([(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)])
    return out


def split_eval_metric(name: str, params: dict) -> tuple[str, str | None] | None:
    """("eval/fvd", protocol id) for an eval metric of a run with `params`; None for other metrics."""
    parts = name.split("/")
    if parts[0] != "eval" or len(parts) < 2:
        return None
    if len(parts) == 3 and _PROTOCOL_ID.match(parts[1]):
        return f"eval/{parts[2]}", parts[1]
    return name, params.get(PROTOCOL_PARAM)


def protocol_of(run: Any, protocol_id: str | None) -> dict | None:
    """The protocol a run recorded for `protocol_id` (tag eval.protocol.<id>), None if absent or unreadable."""
    import json

    text = (getattr(run.data, "tags", None) or {}).get(f"{PROTOCOL_TAG_PREFIX}{protocol_id}")
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def last_step(run: Any, metric: str) -> int | None:
    """The step of `metric`'s latest value as search_runs returns it (no extra request), else None."""
    for m in getattr(run.data, "_metric_objs", None) or []:
        if m.key == metric:
            return int(m.step)
    return None
