"""Planning a precompute run at any manifest size: manifest -> work units -> which are still to do.

A manifest of 10M rows is read as a stream of Arrow batches (pyarrow datasets: CSV, JSONL,
Parquet; one file or a folder of part files), checked and cut into work units column-wise. Per
unit, one sha256 of the unit's rows joined into one string (the only Python per unit; none per
row). Pending units (those without a finished shard) are written, with their rows, to
<output>/plan/part-*.parquet, which the Ray pipeline reads in the cluster, so the driver never holds
the manifest. A bad row fails the plan; its message comes from the per-row reader of
source/manifest.py, run again on the offending file only, so it names the file, row, line and
column exactly as before.

A unit's id is a hash of the settings and of its rows (path, start, end, caption) in order, so the
same manifest and settings always give the same units, and appending rows leaves every full unit
before them unchanged.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.source.manifest import (
    MANIFEST_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ManifestError,
    read_manifest,
    read_video_folder,
)
from pipeline.storage.uri import REMOTE_SCHEMES

PLAN_DIR = "plan"
VIDEO_TYPE = pa.struct([("path", pa.string()), ("caption", pa.string()), ("start", pa.float64()),
                        ("end", pa.float64()), ("source_row", pa.int64())])
PLAN_SCHEMA = pa.schema([("unit_id", pa.string()), ("videos", pa.list_(VIDEO_TYPE))])
_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".parquet": "parquet"}
_EXTENSION = re.compile(r"\.(" + "|".join(sorted(e[1:] for e in VIDEO_EXTENSIONS)) + r")$", re.IGNORECASE)


@dataclass(kw_only=True)
class Plan:
    """What a run will do: counts, every unit's id (manifest order) and where the pending units are."""

    records: int
    """Manifest rows (videos or time windows)."""
    unit_ids: pa.Array
    """Every work unit's id, in manifest order (string array)."""
    finished: int
    """Units whose shard exists already (skipped)."""
    pending_rows: int
    """Manifest rows in the pending units."""
    plan_files: list[str] = field(default_factory=list)
    """Parquet files of the pending units (PLAN_SCHEMA); empty when the plan was not written."""

    @property
    def units(self) -> int:
        return len(self.unit_ids)

    @property
    def pending(self) -> int:
        return self.units - self.finished


def _manifest_files(path: Path) -> list[Path]:
    """The manifest's part files: the file itself, or a folder's manifest files (sorted by name)."""
    if path.is_file():
        if path.suffix.lower() not in _FORMATS:
            raise ManifestError(f"unknown manifest type {path.suffix or '(no extension)'!r}; "
                                f"use {', '.join(MANIFEST_EXTENSIONS)} or a folder of videos", file=path)
        return [path]
    parts = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _FORMATS)
    kinds = {_FORMATS[p.suffix.lower()] for p in parts}
    if len(kinds) > 1:
        raise ManifestError(f"holds manifest parts of several formats ({', '.join(sorted(kinds))}); "
                            "keep one format per folder", file=path)
    return parts


def is_manifest_folder(path: str | os.PathLike) -> bool:
    """A folder of manifest part files (not a folder of videos with .txt captions)."""
    path = Path(path)
    return path.is_dir() and bool(_manifest_files(path)) and not any(
        p.suffix.lower() in VIDEO_EXTENSIONS for p in path.iterdir())


def _dataset(files: list[str], columns: list[str], filesystem: pafs.FileSystem | None = None) -> pads.Dataset:
    suffix = posixpath.splitext(files[0])[1].lower()
    kind = _FORMATS[suffix]
    if kind == "csv":
        import pyarrow.csv as pacsv

        # Every column as text, like the csv module: a caption "7" stays a caption; times are parsed below.
        delimiter = "\t" if suffix == ".tsv" else ","
        fmt = pads.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                 convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}))
        return pads.dataset(files, format=fmt, filesystem=filesystem)
    return pads.dataset(files, format=kind, filesystem=filesystem)


def _seconds(column: pa.ChunkedArray | None, length: int) -> pa.Array:
    """Times as float64 (empty text / null -> null); raises pa.ArrowInvalid on a non-number."""
    if column is None:
        return pa.nulls(length, pa.float64())
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = pc.if_else(pc.equal(pc.utf8_trim_whitespace(column), ""), None, column)
    return pc.cast(column, pa.float64())


def _checked_rows(table: pa.Table, cols: dict[str, str], base: str) -> pa.Table:
    """(path, caption, start, end) of a batch, or pa.ArrowInvalid / ValueError on the first bad row
    (the caller then lets the per-row reader name it)."""
    n = table.num_rows
    video, caption = table.column(cols["video"]), table.column(cols["caption"])
    if not all(pa.types.is_string(c.type) for c in (video, caption)):
        raise ValueError("a non-text video path or caption")
    video, caption = pc.utf8_trim_whitespace(video), pc.utf8_trim_whitespace(caption)
    start = _seconds(table.column(cols["start"]) if cols["start"] in table.column_names else None, n)
    end = _seconds(table.column(cols["end"]) if cols["end"] in table.column_names else None, n)
    ok = pc.and_kleene(pc.invert(pc.equal(caption, "")), pc.match_substring_regex(video, _EXTENSION.pattern,
                                                                                 ignore_case=True))
    # A URI only for object storage pyarrow reaches (s3://, gs://, ...); any other scheme is refused.
    uri = pc.match_substring(video, "://")
    known = pc.match_substring_regex(video, "^(" + "|".join(REMOTE_SCHEMES) + ")://", ignore_case=True)
    ok = pc.and_kleene(ok, pc.or_kleene(pc.invert(uri), known))
    for t in (start, end):
        ok = pc.and_kleene(ok, pc.or_kleene(pc.is_null(t), pc.and_(pc.is_finite(t), pc.greater_equal(t, 0.0))))
    window = pc.if_else(pc.is_null(start), pc.greater(end, 0.0), pc.greater(end, start))
    ok = pc.and_kleene(ok, pc.or_kleene(pc.is_null(end), window))
    if not pc.all(pc.fill_null(ok, False)).as_py():
        raise ValueError("a row fails the manifest checks")
    # Relative paths resolve against the manifest's folder (or prefix: `base` may be s3://bucket/dir);
    # normpath and "~" wait for the decode task.
    relative = pc.invert(pc.or_(pc.or_(pc.starts_with(video, "/"), pc.starts_with(video, "~")), uri))
    path = pc.if_else(relative, pc.binary_join_element_wise(base, video, "/"), video)
    return pa.table({"path": path, "caption": caption, "start": start, "end": end})


def _precise_error(file: Path, cols: dict[str, str], first_row: int, err: Exception) -> ManifestError:
    """The per-row reader's error for `file` (exact row, line, column), or a general one."""
    try:
        read_manifest(file, video_column=cols["video"], caption_column=cols["caption"],
                      start_column=cols["start"], end_column=cols["end"])
    except ManifestError as precise:
        return precise
    return ManifestError(f"cannot read rows from {first_row} on: {err}", file=file)


def _remote_manifest_files(manifest: str) -> tuple[pafs.FileSystem, list[str]]:
    """(file system, the manifest's part files as paths in it) for a manifest on object storage: one
    file, or a prefix ("folder") of part files, sorted by name."""
    filesystem, path = storage.resolve(manifest)
    shown = storage.redact(manifest)
    try:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.File:
            if posixpath.splitext(path)[1].lower() not in _FORMATS:
                raise ManifestError(f"unknown manifest type {posixpath.splitext(path)[1] or '(no extension)'!r}; "
                                    f"use {', '.join(MANIFEST_EXTENSIONS)}", file=shown)
            return filesystem, [path]
        if info.type == pafs.FileType.NotFound:
            raise ManifestError("manifest not found (no such object or prefix)", file=shown)
        listed = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    except OSError as err:
        raise storage.storage_error(manifest, "read the manifest", err) from None
    names = sorted(i.path for i in listed if i.type == pafs.FileType.File)
    if any(posixpath.splitext(n)[1].lower() in VIDEO_EXTENSIONS for n in names):
        raise ManifestError("a folder of videos on object storage cannot be listed as a manifest: write a "
                            f"manifest ({', '.join(MANIFEST_EXTENSIONS)}) with a video and a caption column; "
                            "relative video paths resolve against its location", file=shown)
    parts = [n for n in names if posixpath.splitext(n)[1].lower() in _FORMATS]
    kinds = {_FORMATS[posixpath.splitext(n)[1].lower()] for n in parts}
    if len(kinds) > 1:
        raise ManifestError(f"holds manifest parts of several formats ({', '.join(sorted(kinds))}); "
                            "keep one format per folder", file=shown)
    if not parts:
        raise ManifestError(f"no manifest files ({', '.join(MANIFEST_EXTENSIONS)})", file=shown)
    return filesystem, parts


def _manifest_parts(manifest: str | os.PathLike) -> tuple[pafs.FileSystem | None, list[tuple[str, str, int]]]:
    """(file system or None for local files, [(name in messages, path to read, size in bytes)])."""
    if storage.is_remote(manifest):
        scheme = str(manifest).split("://", 1)[0]
        filesystem, paths = _remote_manifest_files(str(manifest))
        sizes = [i.size for i in filesystem.get_file_info(paths)]
        return filesystem, [(f"{scheme}://{p}", p, int(n)) for p, n in zip(paths, sizes)]
    root = Path(manifest).expanduser().absolute()
    if not root.exists():
        raise ManifestError("manifest not found (or not a file)", file=root)
    files = _manifest_files(root)
    if not files:
        raise ManifestError(f"no manifest files ({', '.join(MANIFEST_EXTENSIONS)})", file=root)
    return None, [(str(f), str(f), f.stat().st_size) for f in files]


def manifest_batches(manifest: str | os.PathLike, *, video_column: str = "video", caption_column: str = "caption",
                     start_column: str = "start", end_column: str = "end",
                     batch_rows: int = 1 << 18) -> Iterator[pa.Table]:
    """The manifest's rows as checked Arrow batches of (path, caption, start, end, source_row).
    `manifest` may be on object storage (s3://bucket/videos.csv or a prefix of part files)."""
    cols = {"video": video_column, "caption": caption_column, "start": start_column, "end": end_column}
    root = None if storage.is_remote(manifest) else Path(manifest).expanduser().absolute()
    if root is not None and root.is_dir() and not is_manifest_folder(root):  # a folder of videos: small
        records = read_video_folder(root)
        yield pa.table({"path": [r.path for r in records], "caption": [r.caption for r in records],
                        "start": pa.nulls(len(records), pa.float64()), "end": pa.nulls(len(records), pa.float64()),
                        "source_row": pa.array(range(len(records)), pa.int64())})
        return
    filesystem, parts = _manifest_parts(manifest)
    offset = 0
    for name, file, size in parts:
        if not size:
            raise ManifestError("no records; the manifest lists no videos", file=name)
        try:
            dataset = _dataset([file], [c for c in cols.values()], filesystem)
            present = dataset.schema.names
            for column, option in ((video_column, "video_column"), (caption_column, "caption_column")):
                if column not in present:
                    raise ManifestError(f"missing column; columns present: {', '.join(present) or '(none)'}; "
                                        f"pass {option}=... to use another name", file=name, column=column)
            wanted = [c for c in dict.fromkeys(cols.values()) if c in present]
            base = name.rsplit("/", 1)[0]  # the manifest's folder, or its prefix on object storage
            rows_in_file = 0
            # Little read-ahead: the driver's memory stays at a few batches whatever the manifest's size.
            for batch in dataset.to_batches(columns=wanted, batch_size=batch_rows, batch_readahead=1,
                                            fragment_readahead=1):
                table = _checked_rows(pa.Table.from_batches([batch]), cols, base)
                yield table.append_column("source_row", pa.array(np.arange(offset, offset + table.num_rows)))
                offset += table.num_rows
                rows_in_file += table.num_rows
        except ManifestError:
            raise
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, UnicodeDecodeError, OSError) as err:
            if filesystem is not None:  # the per-row reader reads local files only
                raise ManifestError(f"cannot read rows from {offset} on: {storage.uri.mask_secrets(str(err))}",
                                    file=storage.redact(name)) from None
            raise _precise_error(Path(file), cols, offset, err) from None
        if not rows_in_file:
            raise ManifestError("no records; the manifest lists no videos", file=name)


def _unit_ids(rows: pa.Table, rows_per_unit: int, settings_hash: str) -> tuple[list[str], np.ndarray]:
    """Ids of the units of `rows` (whole units only, except a last partial one) and their row offsets."""
    n = rows.num_rows
    offsets = np.append(np.arange(0, n, rows_per_unit), n).astype(np.int32)
    times = [pc.fill_null(pc.cast(rows.column(c), pa.string()), "") for c in ("start", "end")]
    keys = pc.binary_join_element_wise(rows.column("path"), *times, rows.column("caption"), "\x1f")
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), keys.combine_chunks()), "\x1e")
    # Hash straight from the Arrow buffer (no Python bytes per unit: a 10M-row plan would otherwise
    # churn through gigabytes of short-lived objects).
    joined = pc.cast(joined, pa.binary())
    _, value_offsets, data = joined.buffers()
    ends = np.frombuffer(value_offsets, dtype=np.int32)[joined.offset:joined.offset + len(joined) + 1]
    data, base = memoryview(data) if data is not None else memoryview(b""), hashlib.sha256(settings_hash.encode() + b"\x1d")
    ids = []
    for first, last in zip(ends[:-1].tolist(), ends[1:].tolist()):
        digest = base.copy()
        digest.update(data[first:last])
        ids.append(digest.hexdigest()[:20])
    return ids, offsets


def plan_run(manifest: str | os.PathLike, *, rows_per_unit: int, settings_hash: str, finished: list[str],
             write_to: str | os.PathLike | None = None, **columns) -> Plan:
    """Read the manifest, make the units, find the finished ones; with `write_to` (the output folder)
    write the pending units to <write_to>/plan/part-*.parquet for the pipeline."""
    done = pa.array(finished, pa.string())
    plan_dir = storage.join(write_to, PLAN_DIR) if write_to is not None else None
    if plan_dir is not None:
        storage.delete(plan_dir)  # a plan belongs to one run
        if not storage.is_remote(plan_dir):
            os.makedirs(plan_dir)
    all_ids, files, records, finished_count, pending_rows = [], [], 0, 0, 0
    carry: pa.Table | None = None  # rows of a unit cut by the batch boundary

    def flush(rows: pa.Table, last: bool) -> pa.Table | None:
        nonlocal finished_count, pending_rows
        whole = rows.num_rows if last else rows.num_rows - rows.num_rows % rows_per_unit
        if whole == 0:
            return rows
        head = rows.slice(0, whole)
        ids, offsets = _unit_ids(head, rows_per_unit, settings_hash)
        ids_array = pa.array(ids, pa.string())
        all_ids.append(ids_array)
        pending = np.flatnonzero(~np.asarray(pc.is_in(ids_array, value_set=done)))
        finished_count += len(ids) - len(pending)
        pending_rows += int((offsets[pending + 1] - offsets[pending]).sum())
        if plan_dir is not None and len(pending):
            videos = pa.StructArray.from_arrays([head.column(c).combine_chunks() for c in VIDEO_TYPE.names],
                                                fields=list(VIDEO_TYPE))
            units = pa.table({"unit_id": ids_array,
                              "videos": pa.ListArray.from_arrays(pa.array(offsets), videos)}, schema=PLAN_SCHEMA)
            path = storage.join(plan_dir, f"part-{len(files):05d}.parquet")
            filesystem, inner = storage.resolve(path)
            # Small row groups: Ray Data reads the file in pieces, so units spread over the decode tasks.
            # On object storage one PUT per part: in the bucket, every node's decode tasks can read it.
            with filesystem.open_output_stream(inner) as sink:
                pq.write_table(units.take(pending), sink, row_group_size=64)
            files.append(path)
        return rows.slice(whole) if whole < rows.num_rows else None

    for batch in manifest_batches(manifest, **columns):
        records += batch.num_rows
        rows = batch if carry is None else pa.concat_tables([carry, batch])
        carry = flush(rows, last=False)
    if carry is not None and carry.num_rows:
        flush(carry, last=True)
    if records == 0:
        raise ManifestError("no records; the manifest lists no videos", file=manifest)
    unit_ids = pa.concat_arrays(all_ids) if all_ids else pa.array([], pa.string())
    return Plan(records=records, unit_ids=unit_ids, finished=finished_count, pending_rows=pending_rows,
                plan_files=files)


def unit_video_id(unit_id: str, row_in_unit: int) -> str:
    """A video's stable id: its unit and its place in it (an identical row twice gives two videos)."""
    return hashlib.sha256(f"{unit_id}/{row_in_unit}".encode()).hexdigest()[:16]
