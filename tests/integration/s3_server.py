"""An S3-compatible object store for tests: moto's server mode (`moto_server`, from `moto[server]` in the
dev extra) in its own process on 127.0.0.1 and a free port. Fixture `s3_server` (session scope,
tests/integration/conftest.py) starts one for the whole session.

Code under test reaches it the way it reaches MinIO or Ceph in production: through the standard
environment, nothing test-specific.

    env = {**os.environ, **s3_server.env}              # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
    bucket = s3_server.create_bucket("my-test")        # a fresh bucket: "my-test-<random>"
    subprocess.run([... "--out", f"s3://{bucket}/latents"], env=env)
    s3_server.list_keys(bucket, "latents/")            # what the code wrote

`env` also holds MLFLOW_S3_ENDPOINT_URL (MLflow's server reads its artifact store's endpoint from it).
The store is in memory: it is empty after a restart. `kill()` is a crash of the store (tests of what
the code does when the endpoint goes away); `start()` brings it back, empty, on the same port.
Each test makes its own bucket (`create_bucket` adds a random suffix): tests share the server.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

from tests.integration.server_process import ServerProcess, free_port, http_ok

REGION = "us-east-1"


class S3Server:
    """moto_server on 127.0.0.1:`port`. Credentials are fixed test values: moto accepts any."""

    access_key_id = "pomvid-test"
    secret_access_key = "pomvid-test-secret"

    def __init__(self, *, port: int | None = None, log_dir: Path | None = None):
        self.port = port or free_port()
        self._own_log_dir = log_dir is None  # a folder of our own is removed by stop()
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="pomvid-s3-"))
        self._server = ServerProcess("moto_server", log_dir / "moto_server.log")

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment a client of this store needs (merge it over os.environ for a subprocess)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def start(self) -> S3Server:
        moto_server = Path(sys.executable).parent / "moto_server"
        if not moto_server.exists():
            raise RuntimeError(f"{moto_server} not found: install the dev extra (moto[server])")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in self.env:  # the server itself must not point at another store
            env.pop(name, None)
        self._server.start([str(moto_server), "-H", "127.0.0.1", "-p", str(self.port)], ready=self._answers, env=env)
        return self

    def stop(self) -> None:
        self._server.stop()
        if self._own_log_dir:
            shutil.rmtree(self._server.log_path.parent, ignore_errors=True)

    def kill(self) -> None:
        self._server.kill()

    @property
    def running(self) -> bool:
        return self._server.running

    @property
    def log_path(self) -> Path:
        return self._server.log_path

    def _answers(self) -> bool:
        return http_ok(f"{self.endpoint_url}/moto-api/")

    # ---- client helpers ------------------------------------------------------------------------

    def client(self):
        """A boto3 S3 client for this store."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key, region_name=REGION)

    def create_bucket(self, prefix: str = "test") -> str:
        """Create a bucket named `<prefix>-<random>` (a valid S3 name) and return its name."""
        name = f"{prefix.lower().replace('_', '-')[:40]}-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under `prefix` in `bucket`, sorted."""
        keys = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return sorted(keys)

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
