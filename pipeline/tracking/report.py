"""Tables for `pomvid runs list` / `pomvid runs compare`, rendered as text, CSV, JSON or Markdown.

A table is a header row plus rows of strings; JSON output uses the structured data instead.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from typing import Any

from pipeline.eval.protocol import summary_of
from pipeline.tracking.compare import (
    MISSING,
    differing_params,
    direction,
    duration_s,
    histories,
    is_throughput,
    metric_names,
    protocol_of,
    run_labels,
    split_eval_metric,
    summarize,
)
from pipeline.tracking.uri import TrackingError

FORMATS = ("table", "csv", "json", "markdown")
TABLE_CELL_LIMIT = 40


def fmt_number(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else MISSING


def run_record(run: Any, label: str) -> dict[str, Any]:
    return {
        "label": label,
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "start_time": fmt_time(run.info.start_time),
        "duration_s": duration_s(run),
    }


# ---- runs compare -------------------------------------------------------------------------------
def build_comparison(
    client: Any,
    runs: Sequence[Any],
    *,
    metrics: Sequence[str] | None = None,
    maximize: Sequence[str] = (),
    minimize: Sequence[str] = (),
    include_system: bool = False,
) -> tuple[dict[str, Any], dict[str, dict[str, list[tuple[int, float]]]]]:
    """(comparison, curves): structured comparison of `runs` and {metric: {label: [(step, value)]}}.

    Eval metrics go to comparison["eval"], one entry per (metric, protocol): a run's `eval/fvd` and
    another run's `eval/fvd` share an entry only when their protocols are the same. curves holds the
    eval entries under their "<metric> [<protocol>]" names. Throughput metrics are always compared,
    even when `metrics` names others.
    """
    if not runs:
        raise TrackingError("no runs to compare")
    labels = run_labels(runs)
    available = metric_names(runs, include_system=True)
    if metrics:
        unknown = [m for m in metrics if m not in available]
        if unknown:
            raise TrackingError(
                f"metrics not logged by any of these runs: {', '.join(unknown)}; "
                f"available: {', '.join(m for m in available if not m.startswith('system/')) or '(none)'}"
            )
        chosen = list(metrics) + [m for m in metric_names(runs) if is_throughput(m) and m not in metrics]
    else:
        chosen = metric_names(runs, include_system=include_system)
    params = differing_params(runs)
    result: dict[str, Any] = {
        "runs": [run_record(r, label) for r, label in zip(runs, labels)],
        "differing_params": {k: dict(zip(labels, v)) for k, v in params.items()},
        "eval": {},
        "metrics": {},
    }
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    plain = [m for m in chosen if not any(split_eval_metric(m, r.data.params) for r in runs)]
    for name, entry, points in _eval_entries(client, runs, labels, [m for m in chosen if m not in plain],
                                             maximize, minimize):
        result["eval"][name] = entry
        curves[name] = points
    # Loss first, then throughput, then the rest (alphabetical within each group).
    plain.sort(key=lambda m: (0 if "loss" in m else 1 if is_throughput(m) else 2, m))
    for metric in plain:
        best = direction(metric, maximize, minimize)
        throughput = is_throughput(metric)
        per_run = histories(client, runs, metric)
        curves[metric] = dict(zip(labels, per_run))
        result["metrics"][metric] = {
            "best": best,
            "throughput": throughput,
            "runs": {label: summarize(points, best, throughput) for label, points in zip(labels, per_run)},
        }
    return result, curves


def _eval_entries(client, runs, labels, names, maximize, minimize):
    """[(display name, entry, {label: points})] for the eval metric keys `names`, one per (metric, protocol)."""
    groups: dict[tuple[str, str | None], dict[str, str]] = {}  # (base, protocol) -> {label: metric key}
    for run, label in zip(runs, labels):
        for key in names:
            split = split_eval_metric(key, run.data.params)
            if split and key in run.data.metrics:
                groups.setdefault(split, {})[label] = key
    out = []
    for (base, pid), keys in sorted(groups.items(), key=lambda item: (item[0][0], str(item[0][1]))):
        best = direction(base, maximize, minimize)
        points, stats, protocol = {}, {}, None
        for run, label in zip(runs, labels):
            series = histories(client, [run], keys[label])[0] if label in keys else []
            points[label] = series
            stats[label] = summarize(series, best)
            protocol = protocol or (protocol_of(run, pid) if label in keys else None)
        entry = {"metric": base, "protocol": pid, "protocol_summary": summary_of(protocol) if protocol else None,
                 "best": best, "runs": stats}
        out.append((f"{base} [{pid or 'unknown protocol'}]", entry, points))
    return out


def compare_rows(data: dict[str, Any]) -> list[list[str]]:
    """Run facts, params that differ, eval metrics (best and final, per protocol), loss, throughput, the rest."""
    labels = [r["label"] for r in data["runs"]]
    rows = [["", *labels]]
    rows.append(["run_id", *(r["run_id"][:8] for r in data["runs"])])
    rows.append(["status", *(r["status"] for r in data["runs"])])
    rows.append(["start", *(r["start_time"] for r in data["runs"])])
    rows.append(["duration", *(fmt_duration(r["duration_s"]) for r in data["runs"])])
    for key, values in data["differing_params"].items():
        rows.append([f"param {key}", *(values[label] for label in labels)])
    for name, info in data.get("eval", {}).items():
        stats = [info["runs"][label] for label in labels]
        rows.append([f"{name} best ({info['best']})", *(fmt_number(s.get("best")) for s in stats)])
        rows.append([f"{name} best step", *(fmt_number(s.get("best_step")) for s in stats)])
        rows.append([f"{name} final", *(fmt_number(s.get("final")) for s in stats)])
    for metric, info in data["metrics"].items():
        stats = [info["runs"][label] for label in labels]
        rows.append([f"{metric} final", *(fmt_number(s.get("final")) for s in stats)])
        rows.append([f"{metric} best ({info['best']})", *(fmt_number(s.get("best")) for s in stats)])
        rows.append([f"{metric} best step", *(fmt_number(s.get("best_step")) for s in stats)])
        if info["throughput"]:
            rows.append([f"{metric} mean", *(fmt_number(s.get("mean")) for s in stats)])
    return rows


def protocol_notes(data: dict[str, Any]) -> list[str]:
    """One line per eval protocol in the comparison: "[3f2a9c1e] 64 videos 16x256x256@8fps, ..."."""
    seen = {}
    for info in data.get("eval", {}).values():
        seen.setdefault(info["protocol"], info["protocol_summary"] or "(protocol not recorded)")
    return [f"[{pid}] {summary}" for pid, summary in seen.items()]


# ---- rendering ----------------------------------------------------------------------------------
def _clip(cell: str) -> str:
    return cell if len(cell) <= TABLE_CELL_LIMIT else cell[: TABLE_CELL_LIMIT - 3] + "..."


def render(rows: list[list[str]], data: dict[str, Any], fmt: str) -> str:
    """`rows` as an aligned text table, CSV or Markdown; `data` as JSON."""
    if fmt == "json":
        return json.dumps(data, indent=2, default=str)
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        return buffer.getvalue().rstrip("\n")
    if fmt == "markdown":
        escape = [[str(c).replace("|", "\\|") for c in row] for row in rows]
        lines = ["| " + " | ".join(escape[0]) + " |", "|" + "---|" * len(escape[0])]
        lines += ["| " + " | ".join(row) + " |" for row in escape[1:]]
        return "\n".join(lines)
    if fmt == "table":
        cells = [[_clip(str(c)) for c in row] for row in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
