"""Eval results into MLflow: the training run at the checkpoint's step, never mixing protocols.

    metrics  eval/fvd, eval/clip_score               the run's first protocol (params eval.protocol = its id)
             eval/<protocol id>/fvd, .../clip_score  any other protocol evaluated on the same run
    params   eval.protocol, eval.<field>             (eval.<id>.<field> for the other protocols)
    tags     eval.protocol.<id>                      the protocol as JSON, for `pomvid runs compare`
    artifacts eval/<id>/step_<N>/eval.json and videos/*.mp4

MLflow params cannot change once logged, so the first protocol evaluated on a run owns the plain names
and every later one gets names carrying its id: a value at `eval/fvd` always has the protocol in
`eval.protocol`. The run's status is left alone (a finished run stays FINISHED). A checkpoint that
names no run (trained with --tracking off) gets a new run in the experiment, tagged pomvid.kind=eval.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.tracking.compare import PROTOCOL_PARAM, PROTOCOL_TAG_PREFIX
from pipeline.tracking.params import TAG_VALUE_LIMIT, to_params


def metric_prefix(run_params: dict, protocol_id: str) -> tuple[str, str]:
    """(metric prefix, param prefix) for `protocol_id` on a run with `run_params`."""
    primary = run_params.get(PROTOCOL_PARAM)
    if primary in (None, protocol_id):
        return "eval/", "eval."
    return f"eval/{protocol_id}/", f"eval.{protocol_id}."


def resolve_store(tracking: str, tracking_uri: str | None, result: dict) -> str | None:
    """The MLflow store to log to: --tracking-uri, MLFLOW_TRACKING_URI, else the run folder's mlflow.db."""
    import os

    from pipeline.tracking.uri import LOCAL_DB_NAME, local_store_uri

    if tracking == "off":
        return None
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    checkpoint = Path(result["checkpoint"])
    for folder in (checkpoint.parent.parent, Path(result.get("run_folder") or checkpoint)):
        if (folder / LOCAL_DB_NAME).is_file():
            return local_store_uri(folder)
    return None


def log_result(result: dict, *, uri: str, experiment: str, out_dir: Path) -> dict:
    """Log `result` (run_eval's) to the store at `uri`; returns {"tracking_uri", "run_id", "metrics"}."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from pipeline.tracking.run import _experiment_id
    from pipeline.tracking.uri import check_reachable, configure_http_env, is_http

    if is_http(uri):
        configure_http_env()
        check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    run_id = result.get("mlflow_run_id")
    run = None
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception:  # noqa: BLE001 - a run id from another store: make a new run below
            run = None
    if run is None:
        name = f"eval-{Path(result['checkpoint']).name}-step{result['step']}"
        run = client.create_run(_experiment_id(client, experiment, uri), run_name=name,
                                tags={"pomvid.kind": "eval", "eval.checkpoint": result["checkpoint"]})
        client.set_terminated(run.info.run_id, "FINISHED")
        run = client.get_run(run.info.run_id)
    run_id, pid, step = run.info.run_id, result["protocol_id"], int(result["step"])
    metric_at, param_at = metric_prefix(run.data.params, pid)
    params = {PROTOCOL_PARAM: pid} if param_at == "eval." else {}
    params.update({f"{param_at}{k}": v for k, v in to_params(result["protocol"]).items()})
    new = [Param(k, v) for k, v in params.items() if k not in run.data.params]
    timestamp = int(time.time() * 1000)
    metrics = {f"{metric_at}{name}": float(value) for name, value in result["metrics"].items()}
    tags = {f"{PROTOCOL_TAG_PREFIX}{pid}": json.dumps(result["protocol"], sort_keys=True)[:TAG_VALUE_LIMIT],
            "eval.last_step": str(step)}
    for start in range(0, len(new), 100):
        client.log_batch(run_id, params=new[start:start + 100], synchronous=True)
    client.log_batch(run_id, metrics=[Metric(k, v, timestamp, step) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
    artifact_dir = f"eval/{pid}/step_{step:08d}"
    client.log_artifact(run_id, str(out_dir / "eval.json"), artifact_dir)
    if (out_dir / "videos").is_dir():
        client.log_artifacts(run_id, str(out_dir / "videos"), f"{artifact_dir}/videos")
    return {"tracking_uri": uri, "run_id": run_id, "metrics": metrics, "artifacts": artifact_dir}
