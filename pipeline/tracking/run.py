"""`start_run`: open (or resume) the MLflow run of a training or precompute job on rank 0.

Creating (or finding) the run is synchronous and raises TrackingError on failure: a job with a wrong URI
or an unknown run id stops before it spends GPU hours. Everything after that, params included, goes
through the run's spool (`<output_dir>/mlflow_spool/<run_id>/`, pipeline.tracking.spool): logging never
raises and never waits on the server. A resumed run first sends what its earlier segment left unsent;
records other runs left in the same output folder (an earlier precompute job) go before that.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.tracking.env import environment_tags
from pipeline.tracking.params import to_params, to_plain, to_tags
from pipeline.tracking.send import RecordSender
from pipeline.tracking.spool import Spool, SpoolBusyError, find_spools, spool_root
from pipeline.tracking.tracker import NullTracker, Tracker
from pipeline.tracking.uri import (
    TrackingError,
    check_reachable,
    configure_http_env,
    is_http,
    local_artifact_uri,
    prepare_local_store,
    resolve_tracking_uri,
    sqlite_path,
)

logger = logging.getLogger("pipeline.tracking")
DEFAULT_EXPERIMENT = "pomvid"
SPOOL_LOCK_WAIT_S = 30.0  # how long a resumed run waits for a dying predecessor to release the spool


def rank_from_env() -> int:
    """The global rank of this process from `RANK` (torchrun / deepspeed launchers), else 0."""
    value = os.environ.get("RANK", "0").strip() or "0"
    try:
        return int(value)
    except ValueError as err:
        raise TrackingError(f"environment variable RANK={value!r} is not an integer") from err


def default_run_name(config: Mapping[str, Any], now: float | None = None) -> str:
    """`<recipe>-YYYYmmdd-HHMMSS` (recipe from config["recipe"] or config["name"], else "run")."""
    recipe = config.get("recipe") or config.get("name") or "run"
    if not isinstance(recipe, str):
        recipe = getattr(recipe, "__name__", str(recipe))
    return f"{recipe}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


def _experiment_id(client: Any, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # In the embedded store, artifacts live next to the database (<output_dir>/mlartifacts);
        # a server decides its own artifact root.
        location = local_artifact_uri(Path(sqlite_path(uri)).parent) if sqlite_path(uri) else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another job created it meanwhile
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} at {uri} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or use another "
            "--experiment name"
        )
    return experiment.experiment_id


def start_run(
    *,
    config: Mapping[str, Any] | Any,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    run_id: str | None = None,
    rank: int | None = None,
    enabled: bool = True,
    output_dir: str | os.PathLike | None = None,
    deepspeed_config: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    system_metrics: bool = True,
    system_metrics_interval: float = 5.0,
    upload_checkpoints: bool = False,
    plots_at_end: bool = True,
    flush_timeout: float = 120.0,
    end_grace_s: float = 5.0,
) -> Tracker | NullTracker:
    """Start (or, with `run_id`, resume) an MLflow run on rank 0; a NullTracker elsewhere or if disabled.

    `config` (dict or dataclass) is logged flattened as params and whole as `config.json`;
    `deepspeed_config` as `deepspeed.*` params and `deepspeed_config.json`. URI: `tracking_uri`, else
    MLFLOW_TRACKING_URI, else `sqlite:///<output_dir>/mlflow.db`. `rank` defaults to the RANK
    environment variable. The spool lives in `<output_dir>/mlflow_spool/<run_id>` (without an output
    folder: a temporary folder, removed when everything was sent). At the end the tracker waits up to
    `flush_timeout` s for the server to take what is left, or `end_grace_s` s once it is failing.
    Raises TrackingUnreachableError (naming the URI) within seconds when an HTTP server does not
    answer, and TrackingError for other problems at start.
    """
    rank = rank_from_env() if rank is None else int(rank)
    if not enabled or rank != 0:
        return NullTracker()
    if not experiment or not isinstance(experiment, str):
        raise TrackingError(f"experiment must be a non-empty name, got {experiment!r}")
    if system_metrics_interval <= 0:
        raise TrackingError(f"system_metrics_interval must be > 0 seconds, got {system_metrics_interval}")
    uri = resolve_tracking_uri(tracking_uri, output_dir)
    if is_http(uri):
        configure_http_env()
        check_reachable(uri)
    else:
        prepare_local_store(uri)

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    plain = to_plain(config)
    if not isinstance(plain, dict):
        raise TrackingError(f"config must be a dict or a dataclass, got {type(config).__name__}")
    client = MlflowClient(tracking_uri=uri)
    created = None
    resume_tags: dict[str, Any] | None = None
    try:
        run_tags = {**environment_tags(), **(tags or {})}
        if run_id is None:
            experiment_id = _experiment_id(client, experiment, uri)
            run = client.create_run(
                experiment_id, run_name=run_name or default_run_name(plain), tags=to_tags(run_tags)
            )
            created = run.info.run_id
            existing: dict[str, str] = {}
            config_name = "config.json"
        else:
            run = _resume(client, run_id, uri)
            experiment_id = run.info.experiment_id
            existing = dict(run.data.params)
            resumes = int(run.data.tags.get("pomvid.resume_count", "0")) + 1
            # Keep the first segment's environment (git commit, host, versions) in the plain tags; a
            # segment that runs elsewhere or on other code records its own as resume_<n>.<tag>.
            resume_tags = {
                (k if run.data.tags.get(k, v) == v else f"resume_{resumes}.{k}"): v
                for k, v in to_tags(run_tags).items()
            }
            resume_tags.update(
                {"pomvid.resume_count": resumes, "pomvid.resumed_at": time.strftime("%Y-%m-%d %H:%M:%S")}
            )
            config_name = f"config.resume_{resumes}.json"
        run_id = run.info.run_id
        spool, temporary = _open_spool(output_dir, run_id, uri, experiment_id)
    except (MlflowException, TrackingError) as err:
        if created is not None:  # do not leave a half-made run RUNNING forever
            try:
                client.set_terminated(created, "FAILED")
            except MlflowException:
                pass
        if isinstance(err, TrackingError):
            raise
        raise TrackingError(f"MLflow tracking at {uri} failed at start: {err}") from err

    params = to_params(plain)
    if deepspeed_config is not None:
        params.update(to_params({"deepspeed": to_plain(deepspeed_config)}))
    # MLflow params are immutable: a resumed run with a changed setting keeps the first value.
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    recorded = _recorded_steps(spool, run) if resume_tags is not None else {}
    if spool.pending():
        logger.warning("MLflow run %s: logging calls of its earlier segment were not sent yet (%s); they are "
                       "sent first", run_id, spool.folder)
    tracker = Tracker(
        client=client,
        tracking_uri=uri,
        experiment_id=experiment_id,
        run_id=run_id,
        spool=spool,
        recorded_steps=recorded,
        upload_checkpoints=upload_checkpoints,
        plots_at_end=plots_at_end,
        flush_timeout=flush_timeout,
        end_grace_s=end_grace_s,
        leftovers=[] if temporary else _leftovers(spool, client, uri),
        remove_spool_when_sent=temporary,
    )
    if resume_tags is not None:
        tracker.set_tags(resume_tags)
        tracker.set_status("RUNNING")
    tracker.log_params({k: v for k, v in params.items() if k not in existing})
    if changed:
        logger.warning(
            "resumed MLflow run %s: params %s differ from the first segment and keep their first "
            "value (MLflow params cannot change); the new config is in %s",
            run_id,
            ", ".join(changed[:20]),
            config_name,
        )
        tracker.set_tags({"pomvid.changed_params_on_resume": ", ".join(changed)[:5000]})
    tracker.log_dict(plain, config_name)
    if deepspeed_config is not None:
        tracker.log_dict(deepspeed_config, "deepspeed_config.json")
    if system_metrics:
        tracker.system_metrics = _start_system_metrics(tracker, recorded, system_metrics_interval)
    logger.info("MLflow run %s (experiment %r) at %s", run_id, experiment, uri)
    return tracker


def _open_spool(output_dir: str | os.PathLike | None, run_id: str, uri: str, experiment_id: str
                ) -> tuple[Spool, bool]:
    """The run's spool and whether it is a temporary one (no local output folder to keep it in)."""
    temporary = output_dir is None or "://" in str(output_dir)
    root = Path(tempfile.mkdtemp(prefix="pomvid-mlflow-spool-")) if temporary else spool_root(output_dir)
    folder = root / run_id
    deadline = time.monotonic() + SPOOL_LOCK_WAIT_S
    while True:
        try:
            spool = Spool.open(folder, run={"run_id": run_id, "tracking_uri": uri, "experiment_id": experiment_id})
            break
        except SpoolBusyError as err:
            if time.monotonic() < deadline:  # a killed predecessor (Ray Train restart) may still be exiting
                time.sleep(0.5)
                continue
            raise TrackingError(
                f"MLflow run {run_id} is being logged by another live process ({err}); two jobs cannot write "
                "one run: stop the other one, or start this one with another --output-dir"
            ) from err
        except OSError as err:
            raise TrackingError(f"cannot create the MLflow spool {folder}: {err}") from err
    return spool, temporary


def _recorded_steps(spool: Spool, run: Any) -> dict[str, int]:
    """The last step of every metric the run's earlier segments recorded: in the spool (sent or not)
    or, for runs logged before there was a spool, on the server."""
    steps = dict(spool.recorded_steps)
    for metric in getattr(run.data, "_metric_objs", []):
        steps[metric.key] = max(steps.get(metric.key, -1), int(metric.step))
    return steps


def _leftovers(spool: Spool, client: Any, uri: str) -> list[tuple[Spool, RecordSender]]:
    """Other runs' spools in the same output folder with unsent records for the same server; the ones
    for another server are only pointed out (`pomvid runs sync` takes --tracking-uri)."""
    found = []
    for folder in find_spools(spool.folder.parent):
        if folder == spool.folder:
            continue
        try:
            other = Spool.open(folder)
        except (SpoolBusyError, OSError, ValueError):
            continue  # a live process sends its own records; a damaged run.json is for `runs sync` to report
        if not other.pending():
            other.close()
        elif other.info.get("tracking_uri") == uri:
            logger.warning("MLflow run %s left unsent logging calls in %s; sending them first",
                           other.info["run_id"], folder)
            found.append((other, RecordSender(client, other.info["run_id"], folder)))
        else:
            logger.warning("MLflow run %s left unsent logging calls for %s in %s; send them with: pomvid runs "
                           "sync %s", other.info["run_id"], other.info.get("tracking_uri"), folder, folder)
            other.close()
    return found


def _resume(client: Any, run_id: str, uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise TrackingError(
            f"cannot resume MLflow run {run_id!r}: not found at {uri} ({err.error_code}). Was the "
            "checkpoint written with another tracking URI? Pass that --tracking-uri, or start a new run."
        ) from err
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(f"cannot resume MLflow run {run_id!r} at {uri}: the run is deleted")
    return run  # marked RUNNING through the spool, after what earlier segments left unsent


def _start_system_metrics(tracker: Tracker, recorded: dict[str, int], interval: float) -> Any:
    from pipeline.tracking.sysmetrics import PREFIX, SystemMetricsSampler

    # A resumed run continues its system metrics' step count instead of overwriting from 0.
    steps = [step for key, step in recorded.items() if key.startswith(PREFIX)]
    try:
        sampler = SystemMetricsSampler(
            lambda metrics, step: tracker.log_metrics(metrics, step),
            interval=interval,
            first_step=max(steps) + 1 if steps else 0,
            node_id=os.environ.get("MLFLOW_SYSTEM_METRICS_NODE_ID"),
        )
    except Exception as err:  # noqa: BLE001 - e.g. psutil missing: log the run without them
        logger.warning("system metrics disabled: %s: %s", type(err).__name__, err)
        return None
    return sampler.start()
