"""Synthetic precompute outputs for loader and shard tests (no Ray, no encoders).

`make_latent_output(root, shards)` writes shards with the real writer and a finished manifest.json.
`shards` is a list (one entry per shard) of lists of (bucket key, text length) per clip. Sample n
(counting over all shards in order) has id "clip-n", caption "caption n", a latent filled with n and
a text embedding whose row j is n + j / 100, so tests can tell which sample they were given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.store.index import finish_manifest
from pipeline.data.store.shards import ShardRow, shard_path, shard_table, write_shard

CHANNELS, TEXT_DIM = 2, 3


def latent_shape(key: str) -> tuple[int, int, int, int]:
    frames, height, width = (int(v) for v in key.split("x"))
    return (CHANNELS, (frames - 1) // 4 + 1, height // 8, width // 8)


def make_latent_output(root: Path, shards: list[list[tuple[str, int]]], *, buckets: list[str] | None = None,
                       storage_dtype: str = "float32") -> dict:
    buckets = buckets or sorted({key for shard in shards for key, _ in shard})
    unit_ids, n = [], 0
    for s, clips in enumerate(shards):
        rows = []
        for key, text_len in clips:
            rows.append(ShardRow(
                id=f"clip-{n}", caption=f"caption {n}",
                latent=np.full(latent_shape(key), float(n), np.float32),
                text=n + np.arange(text_len, dtype=np.float32)[:, None] / 100 + np.zeros((1, TEXT_DIM), np.float32),
                source_path=f"/videos/{n}.mp4", source_row=n, clip_start=0.0, clip_end=1.0, fps=8.0, bucket=key,
            ))
            n += 1
        rows.sort(key=lambda r: buckets.index(r.bucket))  # the writer's contract: rows sorted by bucket
        counts = {k: sum(r.bucket == k for r in rows) for k in buckets if any(r.bucket == k for r in rows)}
        unit_id = f"unit{s:04d}"
        meta = {"unit_id": unit_id, "videos": len(clips), "buckets": counts, "failures": {}}
        write_shard(shard_path(root, unit_id), shard_table(rows, storage_dtype=storage_dtype, metadata=meta))
        unit_ids.append(unit_id)
    manifest = {"buckets": [{"key": k, "latent_shape": list(latent_shape(k))} for k in buckets]}
    return finish_manifest(root, manifest, unit_ids)
