"""The output index: one Parquet row per finished shard, so no reader parses a per-shard JSON list.

At 10M clips (625k shards of 16 rows) a JSON shard list in manifest.json was ~170 MB that every
training rank parsed, and finishing a run read 625k Parquet footers. Now:

    index.parquet        one row per shard, in the run's unit order (what the loader reads)
    index_parts/*.parquet rows appended while a run goes (one small file per batch of finished
                         units); merged into index.parquet at the end of the run, then removed

Columns (INDEX_SCHEMA): file (relative to the output folder), unit_id, rows, videos,
clips_per_bucket (list, in bucket-table order), failures (list of {reason, count}), long_captions
(clips whose caption was longer than the text encoder's max length, cut to it) and
long_caption_examples (the first few such captions of the unit).

Finished units are found with one recursive listing of shards/ (`list_output`), never one exists()
each. Every call goes through a pyarrow file system, so an s3:// output needs no other code here.
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.store.shards import (
    ERRORS_DIR,
    SHARDS_DIR,
    ShardError,
    read_shard_metadata,
    relative_shard_file,
    write_output_manifest,
)

INDEX_NAME = "index.parquet"
INDEX_PARTS_DIR = "index_parts"
FAILURE_TYPE = pa.list_(pa.struct([("reason", pa.string()), ("count", pa.int64())]))
INDEX_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("unit_id", pa.string()),
    ("rows", pa.int64()),
    ("videos", pa.int64()),
    ("clips_per_bucket", pa.list_(pa.int64())),
    ("failures", FAILURE_TYPE),
    ("long_captions", pa.int64()),
    ("long_caption_examples", pa.list_(pa.string())),
])


def filesystem(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(file system, path in it) of an output folder: a URI (s3://...; endpoint and credentials from the
    standard environment, see pipeline/storage) or a local path."""
    return storage.resolve(root)


def list_output(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(unit ids with a finished shard, paths of temporary files left by killed writers), from one
    recursive listing of shards/ and errors/ each."""
    fs, base = filesystem(root)
    finished, leftovers = [], []
    for folder in (SHARDS_DIR, ERRORS_DIR):
        selector = pafs.FileSelector(f"{base}/{folder}", recursive=True, allow_not_found=True)
        for info in fs.get_file_info(selector):
            name = info.base_name
            if name.endswith(".tmp"):
                leftovers.append(info.path)
            elif folder == SHARDS_DIR and name.endswith(".parquet") and info.type == pafs.FileType.File:
                finished.append(name[: -len(".parquet")])
    return finished, leftovers


def index_table(columns: dict) -> pa.Table:
    """A table of INDEX_SCHEMA from python lists (file, unit_id, rows, videos, clips_per_bucket,
    failures as [{"reason", "count"}], long_captions)."""
    return pa.Table.from_pydict({name: columns[name] for name in INDEX_SCHEMA.names}, schema=INDEX_SCHEMA)


class IndexAppender:
    """Appends finished units' index rows as small part files: a run killed at any moment keeps the
    rows of every batch written so far (the end-of-run merge reads the footers of the rest)."""

    def __init__(self, root: str | os.PathLike, *, every_rows: int = 4096, every_seconds: float = 60.0):
        self.fs, self.base = filesystem(root)
        self.every_rows, self.every_seconds = every_rows, every_seconds
        self._pending: list[pa.Table] = []
        self._rows, self._last = 0, time.monotonic()

    def add(self, table: pa.Table) -> None:
        self._pending.append(table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA))
        self._rows += table.num_rows
        if self._rows >= self.every_rows or time.monotonic() - self._last >= self.every_seconds:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            table = pa.concat_tables(self._pending)
            folder = f"{self.base}/{INDEX_PARTS_DIR}"
            if isinstance(self.fs, pafs.LocalFileSystem):  # object stores have no folders to make
                self.fs.create_dir(folder, recursive=True)
            name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
            _write_table_atomic(self.fs, f"{folder}/{name}", table)
        self._pending, self._rows, self._last = [], 0, time.monotonic()


def _write_table_atomic(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write to a temporary name, then move: a reader never sees half a file (on an object store,
    one PUT is atomic already and the move is a copy)."""
    if not isinstance(fs, pafs.LocalFileSystem):  # one PUT (or completed multipart upload): whole or absent
        with fs.open_output_stream(path) as out:
            pq.write_table(table, out)
        return
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as out:
        pq.write_table(table, out)
    fs.move(tmp, path)


def _read_tables(fs: pafs.FileSystem, base: str) -> list[pa.Table]:
    """index.parquet (from earlier runs) then every part, oldest first."""
    tables = []
    if fs.get_file_info(f"{base}/{INDEX_NAME}").type == pafs.FileType.File:
        tables.append(pq.read_table(f"{base}/{INDEX_NAME}", filesystem=fs).cast(INDEX_SCHEMA))
    parts = fs.get_file_info(pafs.FileSelector(f"{base}/{INDEX_PARTS_DIR}", allow_not_found=True))
    for info in sorted((p for p in parts if p.base_name.endswith(".parquet")), key=lambda p: p.base_name):
        tables.append(pq.read_table(info.path, filesystem=fs).cast(INDEX_SCHEMA))
    return tables


def footer_rows(root: str | os.PathLike, unit_ids: list[str], bucket_keys: list[str]) -> pa.Table:
    """Index rows read from the shards' own footers: for shards finished by a run killed before it
    appended their rows (a few per kill), never for all shards."""
    cols: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    for unit_id in unit_ids:
        own = read_shard_metadata(storage.join(root, relative_shard_file(unit_id)))
        buckets = own.get("buckets", {})
        cols["file"].append(relative_shard_file(unit_id))
        cols["unit_id"].append(unit_id)
        cols["rows"].append(own["rows"])
        cols["videos"].append(int(own.get("videos", 0)))
        cols["clips_per_bucket"].append([int(buckets.get(k, 0)) for k in bucket_keys])
        cols["failures"].append([{"reason": r, "count": int(n)} for r, n in sorted(own.get("failures", {}).items())])
        cols["long_captions"].append(int(own.get("long_captions", 0)))
        cols["long_caption_examples"].append(list(own.get("long_caption_examples", [])))
    return index_table(cols)


def build_index(root: str | os.PathLike, unit_ids: pa.Array | list[str], finished: list[str],
                bucket_keys: list[str]) -> pa.Table:
    """index.parquet for the units of `unit_ids` that are `finished`, in the order of `unit_ids`.

    Rows come from the earlier index and the parts (the latest row of a unit wins); finished units
    with no row (their run was killed before appending it) are read from their footers. Writes the
    file atomically and removes the merged parts."""
    fs, base = filesystem(root)
    unit_ids = pa.array(unit_ids, pa.string())
    done = pc.filter(unit_ids, pc.is_in(unit_ids, value_set=pa.array(finished, pa.string())))
    tables = _read_tables(fs, base)
    known = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    position = pc.index_in(known.column("unit_id"), value_set=unit_ids)  # None: not this run's unit
    order = np.asarray(position.fill_null(-1), dtype=np.int64)
    keep = order >= 0
    keep &= np.asarray(pc.is_in(known.column("unit_id"), value_set=done).fill_null(False))
    rows = np.flatnonzero(keep)
    # The latest row per unit: reverse, take the first occurrence of each position.
    latest = rows[::-1][np.unique(order[rows][::-1], return_index=True)[1]]
    indexed = known.take(latest)
    missing = pc.filter(done, pc.invert(pc.is_in(done, value_set=indexed.column("unit_id"))))
    if len(missing):
        indexed = pa.concat_tables([indexed, footer_rows(root, missing.to_pylist(), bucket_keys)])
    sort = np.argsort(np.asarray(pc.index_in(indexed.column("unit_id"), value_set=unit_ids)), kind="stable")
    indexed = indexed.take(sort)
    _write_table_atomic(fs, f"{base}/{INDEX_NAME}", indexed)
    for info in fs.get_file_info(pafs.FileSelector(f"{base}/{INDEX_PARTS_DIR}", allow_not_found=True)):
        fs.delete_file(info.path)
    return indexed


def index_totals(index: pa.Table, bucket_keys: list[str], work_units: int) -> dict:
    """manifest.json's "totals", summed column-wise (no loop over shards)."""
    per_bucket = np.asarray(pc.list_flatten(index.column("clips_per_bucket")), dtype=np.int64)
    per_bucket = per_bucket.reshape(-1, len(bucket_keys)).sum(axis=0) if len(bucket_keys) else per_bucket
    flat = pc.list_flatten(index.column("failures"))
    failures = {}
    if len(flat):
        grouped = pa.table({"reason": pc.struct_field(flat, "reason"), "count": pc.struct_field(flat, "count")}
                           ).group_by("reason").aggregate([("count", "sum")])
        failures = dict(zip(grouped.column("reason").to_pylist(), grouped.column("count_sum").to_pylist()))
    return {
        "work_units": int(work_units),
        "shards": index.num_rows,
        "videos": int(pc.sum(index.column("videos")).as_py() or 0),
        "clips": int(pc.sum(index.column("rows")).as_py() or 0),
        "clips_per_bucket": {k: int(n) for k, n in zip(bucket_keys, per_bucket) if n},
        "failed_videos": int(sum(failures.values())),
        "failures_by_reason": dict(sorted(failures.items())),
        "long_captions": int(pc.sum(index.column("long_captions")).as_py() or 0),
        "long_caption_examples": pc.list_flatten(index.column("long_caption_examples")).slice(0, 5).to_pylist(),
    }


def finish_manifest(root: str | os.PathLike, manifest: dict, unit_ids: pa.Array | list[str],
                    finished: list[str] | None = None) -> dict:
    """Merge the index and write manifest.json's header with totals and status: "complete" when every
    unit of `unit_ids` has its shard, "incomplete" otherwise (a loader refuses it). Shards of units
    not in `unit_ids` (left from an older input manifest) are not indexed. `finished`: the run's
    listing (`list_output`), taken again when not given."""
    keys = [b["key"] for b in manifest.get("buckets") or []]
    if finished is None:
        finished = list_output(root)[0]
    index = build_index(root, unit_ids, finished, keys)
    totals = index_totals(index, keys, len(unit_ids))
    header = {k: v for k, v in manifest.items() if k != "shards"}
    manifest = {**header, "status": "complete" if index.num_rows == len(unit_ids) else "incomplete",
                "index": INDEX_NAME, "totals": totals}
    write_output_manifest(root, manifest)
    return manifest


def read_index(root: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """index.parquet of a finished output (pyarrow; only the columns asked for)."""
    fs, base = filesystem(root)
    path = f"{base}/{INDEX_NAME}"
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except FileNotFoundError:
        raise ShardError(f"{storage.redact(root)}/{INDEX_NAME}: missing; run the same precompute command again to rebuild it") from None
    except (OSError, pa.ArrowInvalid) as err:
        raise ShardError(f"{storage.redact(root)}/{INDEX_NAME}: not readable ({err}); run the same precompute command again") from err
