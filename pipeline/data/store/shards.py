"""The latent store: Parquet shards, manifest.json, index.parquet and errors/*/*.jsonl, each written atomically.

Layout of an output folder (made by `pipeline.data.precompute.run_precompute`):

    manifest.json                 the small header: schema version, encoder fingerprints, latent
                                  scaling/shift, bucket table, settings, totals, status
    index.parquet                 one row per shard (pipeline/data/store/index.py)
    shards/<ab>/<unit_id>.parquet one per work unit, <ab> = the id's first two characters, so a
                                  folder holds about 1/256 of the shards (2.5k at 10M clips);
                                  its existence marks the unit as finished (resume)
    errors/<ab>/<unit_id>.jsonl   one line per failed video of that unit (id, path, reason, message)

Arrays are stored as raw little-endian bytes plus shape and dtype (never pickle). A shard's rows are
sorted by bucket (in the order of the bucket table), then by clip order within the unit, so the
index's per-shard bucket counts locate every row without opening the shard. Every row is its
own Parquet row group, so a reader fetches one sample without decoding its neighbours.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import storage

SCHEMA_VERSION = 2  # 1: a JSON shard list in manifest.json and flat shards/ errors/ folders
PREFIX_LENGTH = 2
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
ERRORS_DIR = "errors"
METADATA_KEY = b"pomvid"  # key of the shard's own metadata (JSON) in the Parquet schema metadata
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# bfloat16 has no numpy dtype: its bytes travel as int16 and are viewed back through torch.
_NUMPY_CARRIER = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}
_BLOB_COLUMNS = ("latent", "text")

SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("caption", pa.string()),
        ("latent", pa.binary()),
        ("latent_shape", pa.list_(pa.int32())),
        ("latent_dtype", pa.string()),
        ("text", pa.binary()),
        ("text_length", pa.int32()),
        ("text_dim", pa.int32()),
        ("text_dtype", pa.string()),
        ("source_path", pa.string()),
        ("source_row", pa.int64()),
        ("clip_start", pa.float64()),
        ("clip_end", pa.float64()),
        ("fps", pa.float64()),
        ("bucket", pa.string()),
    ]
)


class ShardError(RuntimeError):
    """An output folder, shard or manifest that cannot be read as written by precompute."""


@dataclass(kw_only=True)
class ShardRow:
    """One encoded clip, as it goes into a shard."""

    id: str
    """Stable clip id (hash of source path, clip time and settings)."""
    caption: str
    """The caption the text embedding was made from."""
    latent: np.ndarray | torch.Tensor
    """VAE latents (C, T', H', W'), already scaled."""
    text: np.ndarray | torch.Tensor
    """Text embedding of the valid tokens only: (L, D)."""
    source_path: str
    """Absolute path of the source video."""
    source_row: int
    """Row of the video in the input manifest (or index in the folder)."""
    clip_start: float
    """Clip start in seconds within the source video."""
    clip_end: float
    """Clip end in seconds (exclusive) within the source video."""
    fps: float
    """Frame rate the clip was sampled at."""
    bucket: str
    """Bucket key "FRAMESxHEIGHTxWIDTH"."""


def bucket_key(bucket) -> str:
    """"FxHxW" for a `Bucket`-like object (frames, height, width) or a key string (returned as is)."""
    if isinstance(bucket, str):
        return bucket
    return f"{bucket.frames}x{bucket.height}x{bucket.width}"


def array_to_bytes(array: np.ndarray | torch.Tensor, dtype: str) -> bytes:
    """Raw little-endian bytes of `array` cast to the storage dtype (float32, float16 or bfloat16)."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
    if not isinstance(array, torch.Tensor):  # copy: Ray hands out read-only arrays, torch wants writable ones
        array = torch.from_numpy(np.array(array, copy=True))
    tensor = array.detach().to("cpu", STORAGE_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        tensor = tensor.view(torch.int16)
    return tensor.numpy().astype(np.dtype(_NUMPY_CARRIER[dtype]).newbyteorder("<"), copy=False).tobytes()


def bytes_to_tensor(buf: bytes | memoryview, shape, dtype: str) -> torch.Tensor:
    """float32 tensor of `shape` from bytes written by `array_to_bytes` with `dtype`."""
    if dtype not in STORAGE_DTYPES:
        raise ShardError(f"stored dtype {dtype!r} is not one of {sorted(STORAGE_DTYPES)}; the shard is corrupt")
    shape = tuple(int(s) for s in shape)
    flat = np.frombuffer(buf, dtype=np.dtype(_NUMPY_CARRIER[dtype]).newbyteorder("<"))
    if flat.size != int(np.prod(shape, dtype=np.int64)):
        raise ShardError(f"{flat.size} stored values do not fill shape {shape}; the shard is corrupt")
    tensor = torch.from_numpy(flat.astype(flat.dtype.newbyteorder("="), copy=True)).reshape(shape)
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.float()


def bytes_to_view(buf, shape, dtype: str) -> torch.Tensor:
    """A tensor of `shape` in the storage dtype that reads `buf` in place (no copy): for a reader that
    converts to float32 while copying into its batch, in one pass. Little-endian hosts only (others
    use bytes_to_tensor)."""
    if dtype not in STORAGE_DTYPES:
        raise ShardError(f"stored dtype {dtype!r} is not one of {sorted(STORAGE_DTYPES)}; the shard is corrupt")
    if sys.byteorder != "little":
        return bytes_to_tensor(buf, shape, dtype)
    shape = tuple(int(s) for s in shape)
    with warnings.catch_warnings():  # read-only Arrow memory: nothing writes to the view
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(np.frombuffer(buf, dtype=_NUMPY_CARRIER[dtype]))
    if dtype == "bfloat16":
        flat = flat.view(torch.bfloat16)
    if flat.numel() != int(np.prod(shape, dtype=np.int64)):
        raise ShardError(f"{flat.numel()} stored values do not fill shape {shape}; the shard is corrupt")
    return flat.reshape(shape)


def shard_table(rows: list[ShardRow], *, storage_dtype: str, metadata: dict) -> pa.Table:
    """A shard's table (rows in the given order) with `metadata` (JSON) in the schema metadata."""
    columns: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    for row in rows:
        latent, text = row.latent, row.text
        if len(latent.shape) != 4:
            raise ValueError(f"clip {row.id}: latent must be (C, T, H, W), got shape {tuple(latent.shape)}")
        if len(text.shape) != 2:
            raise ValueError(f"clip {row.id}: text embedding must be (L, D), got shape {tuple(text.shape)}")
        columns["id"].append(row.id)
        columns["caption"].append(row.caption)
        columns["latent"].append(array_to_bytes(latent, storage_dtype))
        columns["latent_shape"].append(list(latent.shape))
        columns["latent_dtype"].append(storage_dtype)
        columns["text"].append(array_to_bytes(text, storage_dtype))
        columns["text_length"].append(int(text.shape[0]))
        columns["text_dim"].append(int(text.shape[1]))
        columns["text_dtype"].append(storage_dtype)
        columns["source_path"].append(row.source_path)
        columns["source_row"].append(int(row.source_row))
        columns["clip_start"].append(float(row.clip_start))
        columns["clip_end"].append(float(row.clip_end))
        columns["fps"].append(float(row.fps))
        columns["bucket"].append(row.bucket)
    schema = SHARD_SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    return pa.Table.from_pydict(columns, schema=schema)


def location(root: str | Path, relative: str) -> str | Path:
    """`relative` inside the output `root`: a Path for a local folder, a URI string for object storage
    (a Path would fold "s3://" into "s3:/")."""
    return storage.join(root, relative) if storage.is_remote(root) else Path(root) / relative


def write_shard(path: str | Path, table: pa.Table) -> None:
    """Write one shard atomically: one row group per row, blobs uncompressed and without statistics."""
    small = [name for name in table.schema.names if name not in _BLOB_COLUMNS]
    compression = {name: ("none" if name in _BLOB_COLUMNS else "snappy") for name in table.schema.names}
    storage.put_written(
        path,
        lambda f: pq.write_table(table, f, row_group_size=1, compression=compression, write_statistics=small),
    )


def write_json_atomic(path: str | Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    storage.put_bytes(text.encode(), path)


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    storage.put_bytes(text.encode(), path)


def relative_shard_file(unit_id: str) -> str:
    """The shard's path relative to the output folder: shards/<first two characters>/<unit_id>.parquet."""
    return f"{SHARDS_DIR}/{unit_id[:PREFIX_LENGTH]}/{unit_id}.parquet"


def shard_path(root: str | Path, unit_id: str) -> str | Path:
    return location(root, relative_shard_file(unit_id))


def errors_path(root: str | Path, unit_id: str) -> str | Path:
    return location(root, f"{ERRORS_DIR}/{unit_id[:PREFIX_LENGTH]}/{unit_id}.jsonl")


def _file_system(path: str | Path):
    """(pyarrow file system, path in it) for a shard: None for a local file (memory-mapped reads)."""
    return storage.resolve(path) if storage.is_remote(path) else (None, str(path))


def read_shard_metadata(path: str | Path) -> dict:
    """The shard's own metadata (unit id, counts) plus "rows", read from the Parquet footer only."""
    try:
        fs, inner = _file_system(path)
        meta = pq.read_metadata(inner, filesystem=fs)
        own = json.loads((meta.metadata or {}).get(METADATA_KEY, b"{}"))
    except (OSError, pa.ArrowInvalid, ValueError) as err:
        raise ShardError(f"{storage.redact(path)}: not a readable shard ({err}); delete it and run precompute "
                         "again") from err
    own["rows"] = meta.num_rows
    return own


def read_shard(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A whole shard as a pyarrow table (memory-mapped)."""
    fs, inner = _file_system(path)
    try:
        return pq.read_table(inner, columns=columns, memory_map=fs is None, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as err:
        raise ShardError(f"{storage.redact(path)}: not a readable shard ({err}); delete it and run precompute again") from err


def row_to_sample(table: pa.Table, index: int) -> dict:
    """Row `index` of a shard table as a sample: latent (C,T,H,W) and text (L,D) float32 tensors."""
    row = {name: table.column(name)[index] for name in table.schema.names}
    latent = bytes_to_tensor(row["latent"].as_buffer(), row["latent_shape"].as_py(), row["latent_dtype"].as_py())
    length, dim = row["text_length"].as_py(), row["text_dim"].as_py()
    text = bytes_to_tensor(row["text"].as_buffer(), (length, dim), row["text_dtype"].as_py())
    return {
        "id": row["id"].as_py(),
        "caption": row["caption"].as_py(),
        "latent": latent,
        "text": text,
        "bucket": row["bucket"].as_py(),
        "source_path": row["source_path"].as_py(),
        "source_row": row["source_row"].as_py(),
        "clip_start": row["clip_start"].as_py(),
        "clip_end": row["clip_end"].as_py(),
        "fps": row["fps"].as_py(),
    }


def read_samples(path: str | Path) -> list[dict]:
    """Every row of a shard as samples (see `row_to_sample`)."""
    table = read_shard(path)
    return [row_to_sample(table, i) for i in range(table.num_rows)]


def read_output_manifest(root: str | Path) -> dict | None:
    """The output folder's manifest.json, or None when there is none."""
    path = location(root, MANIFEST_NAME)
    try:
        if not storage.exists(path):
            return None
        manifest = json.loads(storage.read_bytes(path))
    except (OSError, ValueError, storage.StorageError) as err:
        raise ShardError(f"{path}: not valid JSON ({err}); run precompute again with --overwrite") from err
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version == 1:
        raise ShardError(
            f"{path}: made by an older pomvid (schema 1: a JSON list of shards, no index.parquet) that this "
            "version does not read; run the same precompute command again with --overwrite (or into a new "
            "folder) to rebuild the output in the current layout"
        )
    if version != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema_version {version!r}, this code reads {SCHEMA_VERSION}; "
            "run precompute again with --overwrite to rebuild the output"
        )
    return manifest


def write_output_manifest(root: str | Path, manifest: dict) -> None:
    write_json_atomic(location(root, MANIFEST_NAME), {**manifest, "schema_version": SCHEMA_VERSION})


def read_errors(root: str | Path) -> list[dict]:
    """Every error line of every errors/*/*.jsonl file, sorted by file name then line."""
    records = []
    files = [f for f in storage.list_files(location(root, ERRORS_DIR)) if f.count("/") == 1 and f.endswith(".jsonl")]
    for file in sorted(files, key=lambda f: f.rsplit("/", 1)[1]):
        for line in storage.read_bytes(location(root, f"{ERRORS_DIR}/{file}")).decode().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records
