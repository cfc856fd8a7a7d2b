"""Where runs go: resolving the tracking URI, and failing fast when a tracking server is not there.

Precedence: an explicit URI (`--tracking-uri`), else `MLFLOW_TRACKING_URI`, else the embedded store
`sqlite:///<output_dir>/mlflow.db` with artifacts in `<output_dir>/mlartifacts` (no server needed).

MLflow's HTTP client retries a refused connection with exponential backoff for minutes by default
(7 retries, factor 2). A trainer must neither hang at start nor stall behind those retries when the
server dies, so for HTTP stores we (a) probe `/health` once at start with a short timeout and no
retries, and (b) turn MLflow's own retries off: `pipeline.tracking` retries in its background thread,
with its own bound and one warning per outage, instead (urllib3 would also log a warning per retry).
Values the user exported explicitly are left alone.
"""

from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

# MLflow HTTP settings applied (unless already set) for http(s) stores; see the module docstring.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
PROBE_TIMEOUT_S = 5.0
LOCAL_DB_NAME = "mlflow.db"
LOCAL_ARTIFACTS_DIR = "mlartifacts"


class TrackingError(RuntimeError):
    """MLflow tracking cannot start (bad URI, unknown run to resume, deleted experiment...)."""


class TrackingUnreachableError(TrackingError):
    """The tracking server did not answer at start."""


def local_store_uri(output_dir: str | os.PathLike) -> str:
    """The embedded SQLite store of an output folder: `sqlite:////abs/<output_dir>/mlflow.db`."""
    return f"sqlite:///{Path(output_dir).expanduser().resolve() / LOCAL_DB_NAME}"


def local_artifact_uri(output_dir: str | os.PathLike) -> str:
    """Artifact root used for experiments created in the embedded store: `<output_dir>/mlartifacts`."""
    return (Path(output_dir).expanduser().resolve() / LOCAL_ARTIFACTS_DIR).as_uri()


def resolve_tracking_uri(tracking_uri: str | None = None, output_dir: str | os.PathLike | None = None) -> str:
    """The URI runs go to: `tracking_uri`, else `MLFLOW_TRACKING_URI`, else the store in `output_dir`."""
    if tracking_uri:
        return tracking_uri
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    if output_dir is None:
        raise TrackingError(
            "no tracking URI: pass --tracking-uri (or tracking_uri=), set MLFLOW_TRACKING_URI, or give "
            "an output_dir for the embedded store <output_dir>/mlflow.db"
        )
    return local_store_uri(output_dir)


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, or None for other stores."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def configure_http_env() -> None:
    """Lower MLflow's HTTP retries and timeout for this process unless the user set them."""
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise TrackingUnreachableError within about `timeout` seconds if an HTTP store does not answer.

    Any HTTP answer counts as reachable (a proxy may not route `/health`; real API errors then surface
    with their own message); only a refused connection, a DNS failure or a timeout fail. Non-HTTP
    stores (sqlite, file, databricks) are not probed.
    """
    if not is_http(uri):
        return
    url = uri.rstrip("/") + "/health"
    context = None
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
        context = ssl._create_unverified_context()  # the user asked MLflow to skip TLS checks too
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context):  # noqa: S310 - http(s) only
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnreachableError(
            f"MLflow tracking server at {uri} is not reachable ({reason}). Start it, e.g.\n"
            f"  mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000\n"
            "or pass another --tracking-uri (or unset MLFLOW_TRACKING_URI to use the local store in the "
            "output folder), or run without tracking with --tracking off."
        ) from err


def prepare_local_store(uri: str) -> None:
    """Create the folder of a sqlite store so MLflow can create the database file."""
    path = sqlite_path(uri)
    if path is not None and str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
