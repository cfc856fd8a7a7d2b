"""Parsing URIs into (pyarrow FileSystem, path), joining them, and keeping secrets out of messages."""

from __future__ import annotations

import os
import re
from urllib.parse import quote, urlsplit, urlunsplit

# Schemes pyarrow.fs.FileSystem.from_uri understands (abfs/abfss: Azure, pyarrow >= 16; hdfs: libhdfs).
REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
# Environment variables whose values must never reach a message.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_CLIENT_SECRET")


class StorageError(RuntimeError):
    """Object storage could not be used; the message names the URI (without secrets) and what to check."""


def is_remote(uri: str | os.PathLike) -> bool:
    """True for an object-store URI (s3://, gs://, abfs://, ...); False for a local path or file://."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def redact(uri: str | os.PathLike) -> str:
    """`uri` without user:password@ (pyarrow accepts credentials there; they must never be printed)."""
    text = str(uri)
    if "://" not in text:
        return text
    parts = urlsplit(text)
    if "@" not in parts.netloc:
        return text
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def mask_secrets(text: str) -> str:
    """`text` with the values of secret environment variables replaced by ***."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"://[^/@\s]+@", "://***@", text)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """`uri` with `parts` appended by "/" (a local path stays a local path)."""
    text = str(uri).rstrip("/")
    for part in parts:
        text = f"{text}/{str(part).strip('/')}"
    return text


def resolve(uri: str | os.PathLike):
    """(pyarrow FileSystem, path inside it) for a local path or a URI; StorageError for an unknown scheme."""
    import pyarrow.fs as pafs

    text = str(uri)
    if not is_remote(text):
        local = text[len("file://"):] if text.startswith("file://") else text
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))
    scheme = text.split("://", 1)[0].lower()
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(f"{redact(text)}: unknown storage scheme {scheme}://; use a local path or one of "
                           f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    if scheme == "s3" and "endpoint_override=" not in text:
        # Said explicitly: pyarrow's own reading of these variables depends on its version (13 / 16).
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            text += ("&" if "?" in text else "?") + "endpoint_override=" + quote(endpoint, safe="")
    try:
        # from_uri reads the rest of the standard environment (credentials, region, profile).
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (OSError, ValueError, ImportError) as err:
        raise StorageError(f"{redact(uri)}: cannot open this location: {mask_secrets(str(err))}") from None
    return filesystem, path.rstrip("/")


# What pyarrow's S3 client says (its "AWS Error <CODE>") -> what the user should check.
_CAUSES = (
    (("NETWORK_CONNECTION", "Could not connect", "Could not resolve", "Timeout was reached", "curlCode"),
     "the endpoint cannot be reached: check AWS_ENDPOINT_URL (MinIO/Ceph/other S3-compatible stores; unset for "
     "AWS), the network and proxy settings of this node"),
    (("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN", "AccessDenied",
      "403", "Forbidden", "credentials"),
     "access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or "
     "AWS_PROFILE; on Kubernetes the Secret they come from) and that they may list, read and write this bucket"),
    (("NO_SUCH_BUCKET", "NoSuchBucket", "bucket does not exist"),
     "the bucket does not exist: create it (e.g. `aws s3 mb s3://BUCKET`) or fix the bucket name"),
)


def storage_error(uri: str | os.PathLike, action: str, err: BaseException) -> StorageError:
    """A StorageError for `action` on `uri` that says what to check, with secrets masked."""
    detail = mask_secrets(str(err))
    for needles, advice in _CAUSES:
        if any(needle in detail for needle in needles):
            return StorageError(f"{redact(uri)}: cannot {action}: {advice} ({detail})")
    return StorageError(f"{redact(uri)}: cannot {action}: {detail}")
