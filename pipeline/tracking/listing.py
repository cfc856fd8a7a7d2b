"""`pomvid runs list`: one line per run, columns a person chooses, a table that fits the terminal.

Default columns: run id, name, status, start, duration, recipe, steps (the last logged train/loss
step), final loss, and each eval metric per protocol (`fvd@3f2a9c1e`, `clip@3f2a9c1e` for CLIP score:
results of different protocols never share a column). `--columns` picks others: these names, any param (`train.lr`) or metric
(`train/samples_per_s`, `eval/fvd`, which expands to one column per protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.tracking.compare import MISSING, duration_s, last_step, run_labels, split_eval_metric

BUILTIN = ("run_id", "name", "status", "start", "duration", "recipe", "steps", "loss")
DEFAULT_COLUMNS = BUILTIN + ("eval",)
LOSS = "train/loss"
MIN_WIDTH = 6
CUTTABLE = ("name", "recipe")
# Left out first when a table is too wide for the terminal (the run id and name stay, as do the numbers).
DROP_FIRST = ("start", "recipe", "duration", "status")


def _eval_columns(runs: Sequence[Any], base: str | None = None) -> list[tuple[str, str, str | None]]:
    """(header, base metric, protocol id) for every eval metric/protocol pair in `runs` (of `base` only if given)."""
    found: dict[tuple[str, str | None], None] = {}
    for run in runs:
        for name in sorted(run.data.metrics):
            split = split_eval_metric(name, run.data.params)
            if split and (base is None or split[0] == base):
                found[split] = None
    short = {"eval/clip_score": "clip"}
    return [(f"{short.get(b, b.removeprefix('eval/'))}@{pid or '?'}", b, pid) for b, pid in sorted(found, key=str)]


def _eval_value(run: Any, base: str, pid: str | None) -> float | None:
    for name, value in run.data.metrics.items():
        if split_eval_metric(name, run.data.params) == (base, pid):
            return value
    return None


def resolve_columns(runs: Sequence[Any], columns: Sequence[str] | None, params: Sequence[str] = (),
                    metrics: Sequence[str] = ()) -> list[tuple[str, str, Any]]:
    """[(header, kind, key)]: kind is builtin | param | metric | eval. Unknown names raise ValueError."""
    from pipeline.tracking.uri import TrackingError

    names = list(columns) if columns else list(DEFAULT_COLUMNS)
    names += [p for p in params if p not in names] + [m for m in metrics if m not in names]
    all_params = set().union(*(r.data.params for r in runs)) if runs else set()
    all_metrics = set().union(*(r.data.metrics for r in runs)) if runs else set()
    out: list[tuple[str, str, Any]] = []
    unknown = []
    for name in names:
        if name in BUILTIN:
            out.append((name, "builtin", name))
        elif name == "eval" or name.startswith("eval/"):
            out += [(h, "eval", (b, pid)) for h, b, pid in _eval_columns(runs, None if name == "eval" else name)]
        elif name in all_metrics:
            out.append((name, "metric", name))
        elif name in all_params:
            out.append((name, "param", name))
        elif runs:
            unknown.append(name)
    if unknown:
        raise TrackingError(f"--columns: {', '.join(unknown)} are neither columns ({', '.join(DEFAULT_COLUMNS)}) nor "
                            "params or metrics of these runs; `--format json` lists everything a run holds")
    return out


def build_list(runs: Sequence[Any], *, columns: Sequence[str] | None = None, params: Sequence[str] | None = None,
               metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """{"columns": headers, "runs": [record per run]}; each record also holds its cells by header."""
    from pipeline.tracking.report import fmt_duration, fmt_number, fmt_time

    chosen = resolve_columns(runs, columns, params or (), metrics or ())
    records = []
    for run, label in zip(runs, run_labels(runs)):
        info, data = run.info, run.data
        values = {"run_id": info.run_id[:8], "name": info.run_name or MISSING, "status": info.status,
                  "start": fmt_time(info.start_time)[:16], "duration": fmt_duration(duration_s(run)),
                  "recipe": data.params.get("recipe", MISSING), "steps": fmt_number(last_step(run, LOSS)),
                  "loss": fmt_number(data.metrics.get(LOSS))}
        cells = {}
        for header, kind, key in chosen:
            if kind == "builtin":
                cells[header] = values[key]
            elif kind == "param":
                cells[header] = data.params.get(key, MISSING)
            elif kind == "metric":
                cells[header] = fmt_number(data.metrics.get(key))
            else:
                cells[header] = fmt_number(_eval_value(run, *key))
        records.append({"label": label, "run_id": info.run_id, "run_name": info.run_name, "status": info.status,
                        "duration_s": duration_s(run), "params": dict(data.params), "metrics": dict(data.metrics),
                        "cells": cells})
    return {"columns": [c[0] for c in chosen], "runs": records}


def list_rows(data: dict[str, Any]) -> list[list[str]]:
    return [list(data["columns"])] + [[r["cells"][c] for c in data["columns"]] for r in data["runs"]]


def fit_width(rows: list[list[str]], width: int, *, cuttable: Sequence[str] = CUTTABLE,
              gap: int = 2) -> tuple[list[list[str]], list[str]]:
    """Rows whose aligned table fits `width` characters: text cells of `cuttable` columns are cut (with "~")
    down to their header or MIN_WIDTH; then columns are left out, DROP_FIRST ones first, then from the
    right. Returns (rows, headers left out)."""
    if not rows:
        return rows, []
    header = rows[0]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    floors = [max(MIN_WIDTH, len(h)) if h in cuttable else w for h, w in zip(header, widths)]
    total = lambda keep: sum(widths[i] for i in keep) + gap * (len(keep) - 1)  # noqa: E731
    keep = list(range(len(header)))
    while total(keep) > width and any(widths[i] > floors[i] for i in keep):
        widest = max((i for i in keep if widths[i] > floors[i]), key=lambda i: widths[i])
        widths[widest] -= 1
    order = [i for name in DROP_FIRST for i in keep if header[i] == name] + keep[::-1]
    for i in order:
        if total(keep) <= width or len(keep) == 1:
            break
        if i in keep:
            keep.remove(i)
    cut = [[row[i] if len(row[i]) <= widths[i] else row[i][: widths[i] - 1] + "~" for i in keep] for row in rows]
    return cut, [header[i] for i in range(len(header)) if i not in keep]
