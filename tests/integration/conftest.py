"""Fixtures for integration tests that need real services. MLflow: see tests/integration/mlflow_server.py."""

from __future__ import annotations

import pytest

from tests.integration.mlflow_server import MlflowServer


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """URI (http://127.0.0.1:PORT) of a real MLflow tracking server shared by the session.

    Tests share it: use an experiment name of your own (e.g. the test's name) and never stop it;
    for a server you can kill, use `mlflow_server_factory`.
    """
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def mlflow_server_factory(tmp_path_factory):
    """start() -> a private, started MlflowServer (kill(), start() again, stop()); stopped after the test."""
    servers: list[MlflowServer] = []

    def start() -> MlflowServer:
        server = MlflowServer(tmp_path_factory.mktemp("mlflow_private"))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
