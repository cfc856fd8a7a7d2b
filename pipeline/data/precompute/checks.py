"""Checks a precompute run makes before any work: storage that can be used, an output every node can write."""

from __future__ import annotations

from pipeline import storage
from pipeline.data.precompute.config import PrecomputeConfig


class PrecomputeError(RuntimeError):
    """A run that cannot start: e.g. an output made with other encoders, buckets or settings."""


def preflight(config: PrecomputeConfig) -> None:
    """One clear error before any work when the manifest or the output on object storage cannot be
    used (missing bucket, wrong credentials, unreachable endpoint); see pipeline/storage/preflight.py."""
    if storage.is_remote(config.manifest):
        storage.preflight(config.manifest.rsplit("/", 1)[0], write=False)
        if not storage.exists(config.manifest):
            raise PrecomputeError(f"{storage.redact(config.manifest)}: no such manifest object or prefix")
    if storage.is_remote(config.output):
        storage.preflight(config.output, write=not config.plan_only)


def check_output_is_shared(config: PrecomputeConfig, nodes: list[dict]) -> None:
    """Refuse a local output path on a cluster of several nodes: the write tasks run on every node,
    each would put its shards on its own disk and no node would hold the whole output."""
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) > 1 and not storage.is_remote(config.output) and not config.output_is_shared:
        hosts = sorted({n.get("NodeManagerAddress", "?") for n in alive})
        raise PrecomputeError(
            f"the output {config.output} is a local path, but the Ray cluster has {len(alive)} nodes "
            f"({', '.join(hosts)}): each would write its shards to its own disk. Write to object storage "
            "(--out s3://BUCKET/PREFIX, gs://, abfs://; credentials from AWS_* / AWS_ENDPOINT_URL) or to a shared "
            "file system mounted at the same path on every node; if this path IS shared (NFS, Lustre, a shared "
            "volume), pass --output-is-shared (output_is_shared=True).")
