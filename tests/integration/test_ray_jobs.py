"""Jobs on a real local Ray cluster (`ray start --head` on 127.0.0.1, token auth on), submitted the way
users submit them: `ray job submit` and `pomvid submit`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.integration.ray_cluster import start_cluster, stop_cluster

ROOT = Path(__file__).resolve().parents[2]
POMVID = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = start_cluster(num_cpus=2)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


def test_submission_without_a_valid_token_says_how_to_provide_one(ray_cluster, tmp_path):
    env = dict(ray_cluster.env, RAY_AUTH_TOKEN="not-the-token", HOME=str(tmp_path))
    result = ray_cluster.run(*POMVID, "submit", "status", "raysubmit_none", "--address", ray_cluster.address, env=env, cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "RAY_AUTH_TOKEN" in result.stderr and "--token-file" in result.stderr

    env.pop("RAY_AUTH_TOKEN")
    result = ray_cluster.run(*POMVID, "submit", "status", "raysubmit_none", "--address", ray_cluster.address, env=env, cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "authentication token" in result.stderr


def test_token_file_is_accepted(ray_cluster, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(ray_cluster.token + "\n")
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = str(tmp_path)
    result = ray_cluster.run(
        *POMVID, "submit", "status", "raysubmit_none", "--address", ray_cluster.address, "--token-file", str(token_file),
        env=env, cwd=ROOT,
    )
    # Authenticated: the server answers that no such job exists (not an auth error).
    assert "authentication" not in (result.stdout + result.stderr).lower(), result.stderr
    assert "raysubmit_none" in result.stderr, result.stderr
