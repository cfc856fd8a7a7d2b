"""Metric curves as PNG files: one file per metric, one curve per run, value against step.

Uses matplotlib's object API with the Agg canvas (no pyplot): no global figure state, no GUI backend,
safe from a background thread and on headless nodes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

_UNSAFE = re.compile(r"[^\w.\-]+")


def plot_filename(metric: str) -> str:
    """A file name for a metric's plot: `train/loss` -> `train_loss.png`."""
    return (_UNSAFE.sub("_", metric).strip("_.") or "metric") + ".png"


def plot_metric(
    metric: str,
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Write a PNG of `metric` with one line per entry of `curves` ({label: [(step, value), ...]}).

    Curves with a single point are drawn as a marker so they stay visible.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for label, points in curves.items():
        if not points:
            continue
        drawn += 1
        points = sorted(points)
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        ax.plot(steps, values, label=label, marker="o" if len(points) == 1 else None, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_metrics(
    histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    out_dir: str | Path,
) -> dict[str, Path]:
    """One PNG per metric in `out_dir`; `histories` is {metric: {run label: [(step, value), ...]}}."""
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    used: set[str] = set()
    for metric in sorted(histories):
        name = plot_filename(metric)
        # Two metrics can map to one file name (`a/b` and `a_b`): keep both.
        stem, index = name[:-4], 1
        while name in used:
            index += 1
            name = f"{stem}_{index}.png"
        used.add(name)
        paths[metric] = plot_metric(metric, histories[metric], out_dir / name)
    return paths


EVAL_PLOT = "eval_metrics.png"


def plot_eval_metrics(series: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: str | Path) -> Path:
    """One PNG with a panel per eval metric and protocol ({"eval/fvd [3f2a9c1e]": {run: [(step, value)]}}),
    each run's values against the checkpoint step: how FVD and CLIP score move as training goes on."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(series)
    columns = min(2, max(1, len(names)))
    rows = (len(names) + columns - 1) // columns or 1
    fig = Figure(figsize=(6 * columns, 3.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, columns, i + 1)
        for label, points in series[name].items():
            if points:
                points = sorted(points)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linewidth=1.2, label=label)
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel(name.split(" ")[0])
        ax.set_title(name, fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    fig.suptitle("eval metrics against training steps (one panel per metric and protocol)")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
