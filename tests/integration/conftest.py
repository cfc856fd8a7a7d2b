"""Fixtures for integration tests that need real services. MLflow: see tests/integration/mlflow_server.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.mlflow_server import MlflowServer, make_template_db


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
