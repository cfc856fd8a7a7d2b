"""Where the videos are: manifests (CSV, JSONL, Parquet) or a folder of videos with .txt captions.

Every record is checked when the manifest is read, so a bad manifest fails at once, before any
work is scheduled, with a ManifestError naming the file, the row and the column. Rows count
records from 0 (the first record under a CSV header is row 0); for CSV and JSONL the message
also gives the 1-based line in the file. Whether the video files exist is not checked here: a
missing file is a per-video failure ("missing") that the pipeline records and skips.
"""

from __future__ import annotations

import csv
import json
import math
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.storage.uri import REMOTE_SCHEMES, is_remote, redact

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg",
                              ".ts", ".mts", ".m2ts", ".flv", ".wmv", ".3gp", ".ogv", ".gif"})
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".parquet")


class ManifestError(ValueError):
    """An invalid manifest or video folder. `file`, `row` and `column` say where (row/column
    None when the problem is not in one row or column)."""

    def __init__(self, message: str, *, file: str | os.PathLike, row: int | None = None,
                 column: str | None = None, line: int | None = None):
        self.file, self.row, self.column, self.line = str(file), row, column, line
        self.problem = message
        where = [self.file]
        if row is not None:
            where.append(f"row {row}" + (f" (line {line})" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}")

    def __reduce__(self):  # keeps the keyword arguments through pickling (Ray ships errors)
        return (_rebuild_error, (self.problem, self.file, self.row, self.column, self.line))


def _rebuild_error(message, file, row, column, line) -> ManifestError:
    return ManifestError(message, file=file, row=row, column=column, line=line)


@dataclass(frozen=True, kw_only=True)
class VideoRecord:
    """One video to use (or one time window of it)."""

    path: str
    """Absolute path of the video file."""
    caption: str
    """Its caption, non-empty."""
    start: float | None = None
    """Seconds from the video's first frame where usable footage starts; None: at the start."""
    end: float | None = None
    """Seconds where usable footage ends (exclusive); None: at the end of the video."""
    source_row: int
    """Index of this record in its manifest (0 = first record) or in its folder's sorted list."""
    source: str
    """The manifest file or folder it came from."""

    def __post_init__(self) -> None:
        if not (os.path.isabs(self.path) or is_remote(self.path)):
            raise ValueError(f"VideoRecord.path={self.path!r}: must be absolute (resolve it first)")
        if not isinstance(self.caption, str) or not self.caption.strip():
            raise ValueError(f"VideoRecord.caption={self.caption!r} for {self.path}: must be non-empty text")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"VideoRecord.{name}={value!r} for {self.path}: must be a number >= 0 or None")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"VideoRecord end={self.end} <= start={self.start} for {self.path}: "
                             f"end must come after start")


@dataclass(frozen=True)
class _Columns:
    video: str
    caption: str
    start: str
    end: str


def _parse_time(value: Any, where: dict, column: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None  # Parquet / pandas null
    if isinstance(value, bool):
        raise ManifestError(f"{value!r} is not a number of seconds", column=column, **where)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{value!r} is not a number of seconds", column=column, **where) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ManifestError(f"{value!r}: expected a finite number of seconds >= 0", column=column, **where)
    return seconds


def _resolve(value: Any, base: Path, where: dict, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"empty or non-text video path {value!r}", column=column, **where)
    text = value.strip()
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in REMOTE_SCHEMES:
            raise ManifestError(f"{redact(text)!r}: unknown storage scheme {scheme}://; use a local path or one of "
                                f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}", column=column, **where)
    suffix = os.path.splitext(text)[1].lower()
    if suffix not in VIDEO_EXTENSIONS:
        raise ManifestError(f"{text!r} has unknown video extension {suffix or '(none)'!r}; "
                            f"known: {' '.join(sorted(VIDEO_EXTENSIONS))}", column=column, **where)
    if is_remote(text):
        return normalize_video_path(text)
    if is_remote(base):  # relative to a manifest on object storage: a key under its prefix
        return normalize_video_path(f"{str(base).rstrip('/')}/{text}")
    path = Path(text).expanduser()
    return os.path.normpath(path if path.is_absolute() else base / path)


def normalize_video_path(path: str) -> str:
    """A local path with "~" expanded and "a/../b" folded; a URI (s3://bucket/key) with its key folded
    the same way (normpath on the whole URI would fold "s3://" into "s3:/")."""
    if is_remote(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.normpath(os.path.expanduser(path))


def _make_record(row_values: dict, cols: _Columns, base: Path, where: dict) -> VideoRecord:
    path = _resolve(row_values.get(cols.video), base, where, cols.video)
    caption = row_values.get(cols.caption)
    if not isinstance(caption, str):
        raise ManifestError(f"caption {caption!r} is not text", column=cols.caption, **where)
    if not caption.strip():
        raise ManifestError("empty caption; every video needs one", column=cols.caption, **where)
    start = _parse_time(row_values.get(cols.start), where, cols.start)
    end = _parse_time(row_values.get(cols.end), where, cols.end)
    if start is not None and end is not None and end <= start:
        raise ManifestError(f"end {end} <= start {start}; the clip window must not be empty",
                            column=cols.end, **where)
    if end is not None and start is None and end <= 0:
        raise ManifestError(f"end {end}: the clip window must not be empty", column=cols.end, **where)
    return VideoRecord(path=path, caption=caption.strip(), start=start, end=end,
                       source_row=where["row"], source=where["file"])


def _check_header(present: list[str], cols: _Columns, file: str) -> None:
    for column, option in ((cols.video, "video_column"), (cols.caption, "caption_column")):
        if column not in present:
            raise ManifestError(f"missing column; columns present: {', '.join(map(str, present)) or '(none)'}; "
                                f"pass {option}=... to use another name", file=file, column=column)


def _read_csv(path: Path, cols: _Columns) -> list[VideoRecord]:
    file = str(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        _check_header(list(reader.fieldnames or []), cols, file)
        records = []
        for row, values in enumerate(reader):
            where = {"file": file, "row": row, "line": reader.line_num}
            if None in values:  # more cells than header names
                raise ManifestError(f"{len(values) - 1 + len(values[None])} cells but the header has "
                                    f"{len(reader.fieldnames)} columns", **where)
            records.append(_make_record(values, cols, path.parent, where))
    return records


def _read_jsonl(path: Path, cols: _Columns) -> list[VideoRecord]:
    file = str(path)
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = {"file": file, "row": len(records), "line": line_no}
            try:
                values = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"invalid JSON ({e.msg} at character {e.pos})", **where) from None
            if not isinstance(values, dict):
                raise ManifestError(f"expected a JSON object per line, got {type(values).__name__}", **where)
            for column, option in ((cols.video, "video_column"), (cols.caption, "caption_column")):
                if column not in values:
                    raise ManifestError(f"missing column; keys present: {', '.join(values) or '(none)'}; "
                                        f"pass {option}=... to use another name", column=column, **where)
            records.append(_make_record(values, cols, path.parent, where))
    return records


def _read_parquet(path: Path, cols: _Columns) -> list[VideoRecord]:
    import pyarrow.parquet as pq

    file = str(path)
    try:
        schema = pq.read_schema(path)
        _check_header(list(schema.names), cols, file)
        wanted = [c for c in (cols.video, cols.caption, cols.start, cols.end) if c in schema.names]
        rows = pq.read_table(path, columns=list(dict.fromkeys(wanted))).to_pylist()
    except ManifestError:
        raise
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ManifestError(f"cannot read Parquet: {e}", file=file) from None
    return [_make_record(values, cols, path.parent, {"file": file, "row": row, "line": None})
            for row, values in enumerate(rows)]


def read_manifest(path: str | os.PathLike, *, video_column: str = "video", caption_column: str = "caption",
                  start_column: str = "start", end_column: str = "end") -> list[VideoRecord]:
    """Reads and checks a .csv (or .tsv), .jsonl or .parquet manifest.

    The video and caption columns are required; start and end (seconds) are optional columns and
    may be empty in any row. Relative video paths resolve against the manifest's folder.
    """
    path = Path(path).expanduser().absolute()
    cols = _Columns(video=video_column, caption=caption_column, start=start_column, end=end_column)
    readers = {".csv": _read_csv, ".tsv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ManifestError(f"unknown manifest type {path.suffix or '(no extension)'!r}; "
                            f"use {', '.join(MANIFEST_EXTENSIONS)} or a folder of videos", file=path)
    if not path.is_file():
        raise ManifestError("manifest not found (or not a file)", file=path)
    try:
        records = reader(path, cols)
    except UnicodeDecodeError as e:
        raise ManifestError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=path) from None
    if not records:
        raise ManifestError("no records; the manifest lists no videos", file=path)
    return records


def read_video_folder(folder: str | os.PathLike) -> list[VideoRecord]:
    """Every video under folder (recursively, sorted by path), each with the caption in the .txt
    file of the same name next to it (clip.mp4 -> clip.txt)."""
    root = Path(folder).expanduser().absolute()
    if not root.is_dir():
        raise ManifestError("video folder not found (or not a folder)", file=root)
    videos = sorted(p for p in root.rglob("*")
                    if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not videos:
        raise ManifestError(f"no videos (extensions {' '.join(sorted(VIDEO_EXTENSIONS))})", file=root)
    records = []
    for row, video in enumerate(videos):
        caption_file = video.with_suffix(".txt")
        if not caption_file.is_file():
            raise ManifestError(f"no caption file {caption_file.name} next to the video",
                                file=video, row=row, column="caption")
        caption = caption_file.read_text(encoding="utf-8-sig", errors="replace").strip()
        if not caption:
            raise ManifestError(f"empty caption in {caption_file.name}", file=video, row=row, column="caption")
        records.append(VideoRecord(path=str(video), caption=caption, source_row=row, source=str(root)))
    return records


def load_records(path_or_folder: str | os.PathLike, **columns: str) -> list[VideoRecord]:
    """read_video_folder for a folder, read_manifest (with the column names given) for a file.
    Column names other than the defaults make no sense for a folder and are refused."""
    if Path(path_or_folder).expanduser().is_dir():
        defaults = {"video_column": "video", "caption_column": "caption", "start_column": "start",
                    "end_column": "end"}
        unknown = sorted(k for k in columns if k not in defaults)
        changed = sorted(k for k, v in columns.items() if k in defaults and v != defaults[k])
        if unknown or changed:
            raise ManifestError(f"column options {unknown + changed} apply to manifest files, not to a "
                                f"folder of videos with .txt captions", file=path_or_folder)
        return read_video_folder(path_or_folder)
    return read_manifest(path_or_folder, **columns)
