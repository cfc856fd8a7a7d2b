"""infra/mlflow's server, run as deployed: the command line of docker-compose.yaml's `mlflow` service
(read from the file, with the compose service addresses, ports and passwords swapped for local ones)
against a real PostgreSQL and an S3-compatible artifact store. A client that names the server by its
service name is accepted, a training run logs to it, and `pomvid runs compare` reads the run back.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from mlflow import MlflowClient

from pipeline.cli import main as pomvid
from pipeline.media import read_video
from tests.deepspeed_launch import common_args, cpu_env, output_of, read_steps, train_cli
from tests.integration import train_runs
from tests.integration.server_process import ServerProcess, free_port, http_ok

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "infra" / "mlflow" / "docker-compose.yaml"
EXPERIMENT = "test_infra_servers"
COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?::?[?-][^}]*)?\}")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """docker compose's variable interpolation: ${NAME}, ${NAME:?message}, ${NAME:-default}; $$ is a $."""
    def value(match: re.Match) -> str:
        if match.group(1) not in variables:
            raise KeyError(f"{COMPOSE} uses ${{{match.group(1)}}}, which the test does not set")
        return variables[match.group(1)]
    return COMPOSE_VARIABLE.sub(value, text).replace("$$", "$")


def compose_service(name: str) -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"][name]


def option(command: list[str], flag: str) -> str:
    assert command.count(flag) == 1, f"{COMPOSE}: the mlflow command must give {flag} once: {command}"
    return command[command.index(flag) + 1]


def replace_option(command: list[str], flag: str, value: str) -> list[str]:
    index = command.index(flag) + 1
    return [*command[:index], value, *command[index + 1:]]


class ComposeMlflow:
    """The compose file's mlflow service, started here with local stand-ins for its neighbours."""

    def __init__(self, root: Path, postgres, s3):
        self.db_password, self.s3_password = secrets.token_hex(8), secrets.token_hex(8)
        variables = {"MLFLOW_DB_PASSWORD": self.db_password, "MINIO_ROOT_PASSWORD": self.s3_password}
        service = compose_service("mlflow")
        self.compose_command = shlex.split(interpolate(service["command"], variables))
        self.compose_env = {k: interpolate(str(v), variables) for k, v in service["environment"].items()}
        command = self.compose_command
        assert command[:2] == ["mlflow", "server"], command

        # PostgreSQL: the compose URI names service `postgres`, the compose user and database.
        backend = urlsplit(option(command, "--backend-store-uri"))
        postgres_env = compose_service("postgres")["environment"]
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3: the URI names the driver the image has.
        assert (backend.scheme, backend.hostname, backend.port) == ("postgresql+psycopg2", "postgres", 5432), backend
        assert backend.username == postgres_env["POSTGRES_USER"] and backend.password == self.db_password
        assert backend.path == "/" + postgres_env["POSTGRES_DB"], backend
        suffix = secrets.token_hex(3)  # roles and databases are per PostgreSQL cluster: the session's is shared
        self.db_user, self.db_name = f"{backend.username}_{suffix}", f"{backend.path[1:]}_{suffix}"
        backend_uri = postgres.create_database(self.db_name, user=self.db_user, password=self.db_password,
                                               driver="psycopg2")

        # Artifacts: the compose bucket (made by its create-bucket service) becomes a fresh bucket here.
        artifacts = urlsplit(option(command, "--artifacts-destination"))
        assert artifacts.scheme == "s3", artifacts
        self.bucket = s3.create_bucket(artifacts.netloc)
        endpoint = urlsplit(self.compose_env["MLFLOW_S3_ENDPOINT_URL"])
        assert endpoint.hostname == "minio", self.compose_env
        env = {**self.compose_env, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url}

        self.port = free_port()
        assert option(command, "--host") == "0.0.0.0" and option(command, "--port") == "5000"
        local = replace_option(command, "--backend-store-uri", backend_uri)
        local = replace_option(local, "--artifacts-destination", f"s3://{self.bucket}{artifacts.path}")
        local = replace_option(local, "--host", "127.0.0.1")  # servers a test starts bind loopback only
        local = replace_option(local, "--port", str(self.port))
        self.command = [str(Path(sys.executable).parent / "mlflow"), *local[1:]]

        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        # Not on the command line: one worker and no job runner keep the test's process count low.
        self.env.update(env, MLFLOW_WORKERS="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
        self.server = ServerProcess("mlflow server", root / "mlflow-server.log")

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ComposeMlflow:
        self.server.start(self.command, ready=self._healthy, env=self.env, timeout=240)
        return self

    def _healthy(self) -> bool:
        return http_ok(f"{self.uri}/health")

    def get_as(self, host_header: str, path: str = "/api/2.0/mlflow/experiments/search?max_results=1") -> int:
        """Status of a GET sent to this server with `host_header` as the Host (the name a client used)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.putrequest("GET", path, skip_host=True)
            connection.putheader("Host", host_header)
            connection.endheaders()
            return connection.getresponse().status
        finally:
            connection.close()


@pytest.fixture(scope="module")
def compose_mlflow(tmp_path_factory, postgres_server, s3_server):
    mlflow = ComposeMlflow(tmp_path_factory.mktemp("compose_mlflow"), postgres_server, s3_server)
    mlflow.start()
    try:
        yield mlflow
    finally:
        mlflow.server.stop()


def test_compose_mlflow_server_runs_on_postgres_and_s3(compose_mlflow, postgres_server, s3_server, tmp_path,
                                                       capsys):
    mlflow = compose_mlflow
    # The in-network name of the compose file is accepted; a name not in --allowed-hosts is refused.
    allowed = option(mlflow.compose_command, "--allowed-hosts").split(",")
    assert "mlflow:5000" in allowed
    for host in allowed:
        assert mlflow.get_as(host.replace("*", "5000")) == 200, host
    assert mlflow.get_as("attacker.example:5000") == 403

    # A short training run logs params, metrics and a validation video to it.
    out = tmp_path / "run"
    args = [a for a in common_args(train_runs.data(), out, steps=3) if a not in ("--tracking", "off")]
    args += ["--tracking-uri", mlflow.uri, "--experiment", EXPERIMENT, "--run-name", "compose-run",
             "--set", "validation.every=3", "--set", "validation.steps=2", "--set", "train.log_every=1"]
    client_env = {k: v for k, v in cpu_env().items() if not k.startswith("AWS_")}  # no S3 credentials
    result = train_cli(args, env=client_env)
    assert result.returncode == 0, output_of(result) + "\n--- mlflow server\n" + mlflow.server.log_tail()

    client = MlflowClient(mlflow.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["recipe"] == "debug"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert [m.value for m in losses] == pytest.approx([read_steps(out)[s]["loss"] for s in (1, 2, 3)])
    videos = [a.path for a in client.list_artifacts(run.info.run_id, "samples/step_00000003")]
    assert len(videos) == 2 and all(v.endswith(".mp4") for v in videos), videos
    frames = read_video(client.download_artifacts(run.info.run_id, videos[0], str(tmp_path / "download")))
    assert frames.ndim == 4 and frames.shape[-1] == 3

    # The run lives in PostgreSQL, its artifacts in the bucket (through the server: the client has no S3 keys).
    rows = postgres_server.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,),
                                   database=mlflow.db_name, user=mlflow.db_user, password=mlflow.db_password)
    assert rows == [("FINISHED",)]
    stored = s3_server.list_keys(mlflow.bucket)
    assert sum(key.endswith(".mp4") and run.info.run_id in key for key in stored) == 2, stored

    # `pomvid runs compare` reads the run back from the server.
    assert pomvid(["runs", "compare", "--tracking-uri", mlflow.uri, "--experiment", EXPERIMENT, "--format", "json",
                   "--out", str(tmp_path / "plots")]) == 0
    data = json.loads(capsys.readouterr().out)
    final = data["metrics"]["train/loss"]["runs"]["compose-run"]["final"]
    assert final == pytest.approx(losses[-1].value)
    assert Path(data["plots"]["train/loss"]).is_file()
