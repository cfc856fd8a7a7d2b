"""One small, URI-aware file layer for local paths and object storage (s3://, gs://, abfs://, hdfs://).

    from pipeline import storage
    storage.preflight("s3://bucket/runs/x")              # one clear StorageError before any work
    storage.put_file("ckpt/ema.safetensors", "s3://bucket/runs/x/ema.safetensors")
    storage.list_files("s3://bucket/runs/x")             # {"ema.safetensors": 1234, ...}: ONE listing
    storage.get_file("s3://bucket/runs/x/ema.safetensors", "/scratch/ema.safetensors")
    storage.exists(uri); storage.delete(uri); storage.read_bytes(uri); storage.put_bytes(b"...", uri)

Built on pyarrow.fs (not fsspec): pyarrow is already a dependency for the Parquet latents, so S3, GCS,
Azure and HDFS need no extra package (fsspec would need s3fs/gcsfs/adlfs, each pinning its own
botocore/aiohttp stack), pyarrow.parquet reads and writes through the same FileSystem objects, and its
C++ S3 client reads the standard environment itself: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN / AWS_PROFILE, AWS_REGION / AWS_DEFAULT_REGION. AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL (S3-compatible stores such as MinIO, Ceph or moto) is handed to pyarrow as its
endpoint_override by `resolve`, whatever pyarrow version reads these variables itself.

Visibility: an object store has no rename, so `put_file` writes the final key directly and the store
makes it visible only whole: pyarrow sends a small file as one PutObject and a large one as one
multipart upload, which S3 shows only once it is completed. `put_file` then checks the stored size
(a short object is deleted and reported). Local destinations go through a temporary file and an
atomic rename. Secrets never appear in messages: `redact` drops user:password@ from URIs and
StorageError texts have the values of secret environment variables masked.
"""

from pipeline.storage.files import (
    delete,
    exists,
    get_file,
    list_files,
    put_bytes,
    put_file,
    put_written,
    read_bytes,
)
from pipeline.storage.preflight import preflight
from pipeline.storage.uri import StorageError, is_remote, join, redact, resolve

__all__ = [
    "StorageError", "delete", "exists", "get_file", "is_remote", "join", "list_files", "preflight", "put_bytes",
    "put_file", "put_written", "read_bytes", "redact", "resolve",
]
