"""`pomvid export --register NAME`: an export folder as a version of a model in MLflow's model registry.

The folder is logged as an artifact of its training run (export/step_<N>/) and a model version of NAME
is created from it, with tags: the step, the checkpoint, the run, and the run's eval metrics at that
step (`eval/fvd = 123.4`, `eval/fvd.protocol = <id>`; the newest value and its step where the step
itself was not evaluated).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.tracking.compare import split_eval_metric
from pipeline.tracking.uri import TrackingError


def _store(export, tracking_uri: str | None) -> str:
    from pipeline.tracking.uri import LOCAL_DB_NAME, local_store_uri

    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    run_folder = Path(export.source.get("run_folder") or "")
    if run_folder.name and (run_folder / LOCAL_DB_NAME).is_file():
        return local_store_uri(run_folder)
    raise TrackingError(f"--register needs an MLflow store: none at {run_folder / LOCAL_DB_NAME}; pass --tracking-uri "
                        "(the server or database the run was tracked in) or set MLFLOW_TRACKING_URI")


def eval_tags(client, run, step: int) -> dict[str, str]:
    """The run's eval metrics at `step` (else the newest value, with its step) as registry tags."""
    tags = {}
    for name in sorted(run.data.metrics):
        split = split_eval_metric(name, run.data.params)
        if split is None:
            continue
        history = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, name))
        at_step = [h for h in history if h[0] == step]
        chosen = at_step[-1] if at_step else history[-1]
        tags[name] = f"{chosen[2]:.6g}"
        tags[f"{name}.protocol"] = str(split[1])
        tags[f"{name}.step"] = str(chosen[0])
    return tags


def register_export(export, name: str, *, tracking_uri: str | None = None, experiment: str = "pomvid") -> dict:
    """Log `export` (pipeline.export.Export) to its run and register it; returns what was made."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.run import _experiment_id
    from pipeline.tracking.uri import check_reachable, configure_http_env, is_http

    uri = _store(export, tracking_uri)
    if is_http(uri):
        configure_http_env()
        check_reachable(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        run = None
        run_id = export.source.get("mlflow_run_id")
        if run_id:
            try:
                run = client.get_run(run_id)
            except MlflowException:
                run = None
        if run is None:
            made = client.create_run(_experiment_id(client, experiment, uri),
                                     run_name=f"export-{export.folder.name}-step{export.step}",
                                     tags={"pomvid.kind": "export"})
            client.set_terminated(made.info.run_id, "FINISHED")
            run = client.get_run(made.info.run_id)
        artifact_path = f"export/step_{export.step:08d}"
        client.log_artifacts(run.info.run_id, str(export.folder), artifact_path)
        try:
            client.create_registered_model(name, description="pomvid exports (pomvid export --register)")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {"pomvid.step": str(export.step), "pomvid.checkpoint": str(export.source.get("checkpoint")),
                "pomvid.run_id": run.info.run_id, **eval_tags(client, run, export.step)}
        version = client.create_model_version(name, source=f"{run.info.artifact_uri}/{artifact_path}",
                                              run_id=run.info.run_id, tags=tags,
                                              description=f"step {export.step} of {export.source.get('checkpoint')}")
    except MlflowException as err:
        raise TrackingError(f"MLflow at {uri}: registering {name!r} failed: {err}") from err
    return {"version": version.version, "tags": tags, "run_id": run.info.run_id, "tracking_uri": uri,
            "artifact_path": artifact_path}
