"""MLflow tracking for pomvid: rank-0 logging of training and precompute runs, and run comparison.

    from pipeline.tracking import start_run
    with start_run(config=cfg, output_dir=out, experiment="pomvid", deepspeed_config=ds) as tracker:
        tracker.log_metrics({"train/loss": loss}, step=step)
        tracker.log_video("samples/step_100.mp4", step=100)
        tracker.log_checkpoint(ckpt_dir, step=100)
    # tracker.run_id goes into the checkpoint; start_run(..., run_id=that) continues the run.

Ranks other than 0 (and `enabled=False`, i.e. `--tracking off`) get a NullTracker with the same
methods. See docs/tracking.md for the MLflow UI and `pomvid runs list|compare`.
"""

from pipeline.tracking.cliargs import add_tracking_args, tracking_kwargs
from pipeline.tracking.params import flatten_config, to_params
from pipeline.tracking.precompute import failures_from_errors, log_precompute_summary
from pipeline.tracking.run import DEFAULT_EXPERIMENT, default_run_name, rank_from_env, start_run
from pipeline.tracking.tracker import NullTracker, Tracker
from pipeline.tracking.uri import (
    TrackingError,
    TrackingUnreachableError,
    check_reachable,
    local_store_uri,
    resolve_tracking_uri,
)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "TrackingUnreachableError",
    "add_tracking_args",
    "check_reachable",
    "default_run_name",
    "failures_from_errors",
    "flatten_config",
    "local_store_uri",
    "log_precompute_summary",
    "rank_from_env",
    "resolve_tracking_uri",
    "start_run",
    "to_params",
    "tracking_kwargs",
]
