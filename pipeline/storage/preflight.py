"""`preflight(uri)`: check once, before any work, that a storage location can be used.

One StorageError names the URI and what to check: an unreachable endpoint, wrong credentials (or
credentials without access to the bucket), or a missing bucket. With `write=True` a small probe object
is written and deleted, so credentials that can only read fail here and not hours later at the first
checkpoint.
"""

from __future__ import annotations

import os
import secrets
import socket

from pipeline.storage.files import delete, put_bytes
from pipeline.storage.uri import StorageError, is_remote, redact, resolve, storage_error


def preflight(uri: str | os.PathLike, *, write: bool = True) -> None:
    """Raise one StorageError unless `uri` (a folder/prefix) can be listed and, with `write`, written."""
    import pyarrow.fs as pafs

    filesystem, path = resolve(uri)
    if not is_remote(uri):
        if write:
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise StorageError(f"{path}: the folder is not writable by this user")
        return
    bucket = path.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{redact(uri)}: no bucket in the URI; use SCHEME://BUCKET/PREFIX")
    try:
        # HeadBucket: answers "unreachable", "denied" and "missing" apart.
        kind = filesystem.get_file_info(bucket).type
        if kind == pafs.FileType.NotFound:
            raise StorageError(f"{redact(uri)}: the bucket {bucket!r} does not exist (or is in another account or "
                               "endpoint): create it (e.g. `aws s3 mb s3://BUCKET`), fix the bucket name, or check "
                               "AWS_ENDPOINT_URL")
        # A listing needs its own permission (s3:ListBucket); resume lists the prefix.
        filesystem.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as err:
        raise storage_error(uri, "be reached", err) from None
    if write:
        probe = f"{str(uri).rstrip('/')}/.pomvid-preflight-{socket.gethostname()}-{secrets.token_hex(4)}"
        put_bytes(b"pomvid preflight: safe to delete\n", probe)
        delete(probe)
