"""The tracking options every `pomvid` job shares, so `train` and `precompute` spell them the same way.

Use: `add_tracking_args(parser)` when building the parser, then
`start_run(config=..., output_dir=..., **tracking_kwargs(args))`.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.tracking.run import DEFAULT_EXPERIMENT


def add_tracking_args(
    parser: argparse.ArgumentParser, *, default_experiment: str = DEFAULT_EXPERIMENT
) -> None:
    """Add --tracking, --tracking-uri, --experiment, --run-name, --upload-checkpoints to `parser`."""
    group = parser.add_argument_group("tracking (MLflow)")
    group.add_argument(
        "--tracking",
        choices=("on", "off"),
        default="on",
        help="log the run to MLflow (default: on); 'off' when no tracking server is available",
    )
    group.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<output-dir>/mlflow.db)",
    )
    group.add_argument("--experiment", default=default_experiment, help="MLflow experiment name")
    group.add_argument("--run-name", default=None, help="MLflow run name (default: <recipe>-<timestamp>)")
    group.add_argument(
        "--upload-checkpoints",
        action="store_true",
        help="also upload checkpoints as MLflow artifacts (default: only their location is recorded)",
    )


def tracking_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `start_run` keyword arguments matching the options of `add_tracking_args`."""
    return {
        "enabled": getattr(args, "tracking", "on") != "off",
        "tracking_uri": getattr(args, "tracking_uri", None),
        "experiment": getattr(args, "experiment", DEFAULT_EXPERIMENT),
        "run_name": getattr(args, "run_name", None),
        "upload_checkpoints": bool(getattr(args, "upload_checkpoints", False)),
    }
