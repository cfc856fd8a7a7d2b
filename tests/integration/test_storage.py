"""pipeline.storage against a real S3-compatible server (moto, tests/integration/s3_server.py) and a local
folder: the same calls, the same results; and the three bad inputs of preflight (missing bucket, wrong
credentials, unreachable endpoint), each one clear error naming the URI, with no secret in it."""

from __future__ import annotations

import json
import os

import pytest

from pipeline import storage
from tests.integration.s3_server import S3Server
from tests.integration.server_process import free_port


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("s3_env")
    return f"s3://{server.create_bucket('storage')}/runs/x"


def test_put_list_get_delete_round_trip(location, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 << 20))  # over pyarrow's 10 MB part size: a multipart upload on S3
    storage.preflight(location)
    storage.put_file(big, storage.join(location, "step_1", "big.bin"))
    storage.put_bytes(b'{"a": 1}', storage.join(location, "step_1/rng/rank_00000.json"))
    storage.put_bytes(b"step_1\n", storage.join(location, "latest"))

    # One recursive listing: relative paths and sizes; the preflight probe is gone.
    assert storage.list_files(location) == {"step_1/big.bin": 12 << 20, "step_1/rng/rank_00000.json": 8,
                                            "latest": 7}
    assert storage.list_files(storage.join(location, "nothing-here")) == {}
    assert storage.exists(storage.join(location, "latest"))
    assert storage.exists(storage.join(location, "step_1"))  # a non-empty prefix
    assert not storage.exists(storage.join(location, "step_2"))
    assert json.loads(storage.read_bytes(storage.join(location, "step_1/rng/rank_00000.json"))) == {"a": 1}
    got = storage.get_file(storage.join(location, "step_1/big.bin"), tmp_path / "down" / "big.bin")
    assert got.read_bytes() == big.read_bytes()
    assert [p.name for p in got.parent.iterdir()] == ["big.bin"]  # no temporary file left

    storage.delete(storage.join(location, "latest"))
    storage.delete(storage.join(location, "step_1"))  # a whole prefix
    storage.delete(storage.join(location, "step_9"))  # nothing there: no error
    assert storage.list_files(location) == {}
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes(storage.join(location, "latest"))


def test_uri_helpers():
    assert storage.join("s3://b/runs/", "step_1", "/rng/x") == "s3://b/runs/step_1/rng/x"
    assert storage.redact("s3://KEY:SECRET@bucket/p") == "s3://***@bucket/p"
    assert storage.is_remote("gs://b/p") and not storage.is_remote("/data/x") and not storage.is_remote("file:///x")
    with pytest.raises(storage.StorageError, match=r"ftp://host/x: unknown storage scheme ftp://"):
        storage.resolve("ftp://host/x")


def test_preflight_missing_bucket(s3_env):
    uri = "s3://pomvid-no-such-bucket-3f9a/runs/x"
    with pytest.raises(storage.StorageError) as err:
        storage.preflight(uri)
    message = str(err.value)
    assert message.startswith(uri) and "does not exist" in message and "aws s3 mb" in message


def test_preflight_unreachable_endpoint(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(storage.StorageError) as err:
        storage.preflight("s3://some-bucket/runs/x")
    message = str(err.value)
    assert message.startswith("s3://some-bucket/runs/x: ") and "cannot be reached" in message
    assert "AWS_ENDPOINT_URL" in message


def test_preflight_wrong_credentials(tmp_path, monkeypatch):
    # moto checks signatures only in its IAM mode: the first 3 requests (make a user with S3 rights and its
    # key) pass unauthenticated, every later one must be signed by a key moto issued.
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "3")
    server = S3Server(log_dir=tmp_path / "moto").start()
    try:
        import boto3

        iam = boto3.client("iam", endpoint_url=server.endpoint_url, aws_access_key_id="x", aws_secret_access_key="x",
                           region_name="us-east-1")
        iam.create_user(UserName="trainer")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        boto3.client("s3", endpoint_url=server.endpoint_url).create_bucket(Bucket="creds-bucket")
        storage.preflight("s3://creds-bucket/runs/x")  # the right key: fine

        wrong_secret = "not-the-secret-" + key["SecretAccessKey"][:8]
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
        with pytest.raises(storage.StorageError) as err:
            storage.preflight("s3://creds-bucket/runs/x")
        message = str(err.value)
        assert message.startswith("s3://creds-bucket/runs/x: ") and "access denied" in message
        assert "AWS_ACCESS_KEY_ID" in message and wrong_secret not in message
        assert key["SecretAccessKey"] not in message
    finally:
        server.stop()


def test_precompute_checks_its_storage_before_any_work(s3_env, tmp_path, capsys):
    """`pomvid precompute` with a manifest or an output in a missing bucket: one clear error, exit 2,
    nothing started (no Ray, nothing written), no secret printed."""
    from pipeline.cli import main as pomvid

    bucket = s3_env.create_bucket("precompute-preflight")
    flags = ["--buckets", "9x32x32", "--vae", "pixel", "--text-encoder", "clip", "--text-encoder-path", str(tmp_path),
             "--tracking", "off", "--no-progress"]
    missing = "s3://pomvid-no-such-bucket-3f9a"
    assert pomvid(["precompute", "--manifest", f"{missing}/videos.csv", "--out", f"s3://{bucket}/latents", *flags]) == 2
    error = capsys.readouterr().err
    assert f"{missing}: the bucket 'pomvid-no-such-bucket-3f9a' does not exist" in error, error
    assert pomvid(["precompute", "--manifest", f"s3://{bucket}/videos.csv", "--out", f"{missing}/latents",
                   *flags]) == 2
    error = capsys.readouterr().err
    assert "s3://" in error and "no such manifest" in error, error  # the manifest is checked first
    s3_env.client().put_object(Bucket=bucket, Key="videos.csv", Body=b"video,caption\na.mp4,a cat\n")
    assert pomvid(["precompute", "--manifest", f"s3://{bucket}/videos.csv", "--out", f"{missing}/latents",
                   *flags]) == 2
    error = capsys.readouterr().err
    assert f"{missing}/latents: the bucket" in error and "does not exist" in error, error
    assert s3_env.secret_access_key not in error
    assert s3_env.list_keys(bucket) == ["videos.csv"]  # nothing written


def test_precompute_plans_a_manifest_folder_on_s3(s3_env, tmp_path, capsys):
    """A manifest given as a prefix of part files in a bucket is read part by part, in name order
    (`--plan-only`: nothing decoded, no Ray); the URI is printed without credentials."""
    import json as json_module

    from pipeline.cli import main as pomvid

    bucket = s3_env.create_bucket("precompute-parts")
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key="data/parts/part-0.csv", Body=b"video,caption\na.mp4,a\nb.mp4,b\n")
    client.put_object(Bucket=bucket, Key="data/parts/part-1.csv", Body=b"video,caption\nclips/c.mp4,c\n")
    summary = tmp_path / "summary.json"
    code = pomvid(["precompute", "--plan-only", "--manifest", f"s3://{bucket}/data/parts", "--out",
                   f"s3://{bucket}/latents", "--buckets", "9x32x32", "--vae", "pixel", "--text-encoder", "clip",
                   "--text-encoder-path", str(tmp_path), "--rows-per-work-unit", "2", "--tracking", "off",
                   "--summary-json", str(summary)])
    assert code == 0
    counts = json_module.loads(summary.read_text())
    assert counts["videos_in"] == 3 and counts["work_units"] == 2 and counts["work_units_pending"] == 2
    assert f"precompute plan: s3://{bucket}/data/parts -> s3://{bucket}/latents" in capsys.readouterr().out
    assert s3_env.list_keys(bucket, "latents/") == []  # --plan-only writes nothing
