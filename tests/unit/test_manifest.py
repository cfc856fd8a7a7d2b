"""Manifests (CSV, JSONL, Parquet), video folders, and the errors bad ones must raise."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.source.manifest import (
    ManifestError,
    VideoRecord,
    load_records,
    read_manifest,
    read_video_folder,
)

FORMATS = ["csv", "jsonl", "parquet"]


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """rows -> a manifest in the format of path's suffix (every row has the same keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_every_format(tmp_path, fmt):
    rows = [
        {"video": "clips/a.mp4", "caption": " a cat ", "start": "", "end": ""},
        {"video": "/data/b.MKV", "caption": "a dog", "start": "1.5", "end": "4"},
        {"video": "../c.webm", "caption": "a bird", "start": "0", "end": ""},
    ]
    if fmt != "csv":  # typed values and nulls, as JSON and Parquet hold them
        rows = [{**r, "start": float(r["start"]) if r["start"] else None,
                 "end": float(r["end"]) if r["end"] else None} for r in rows]
    manifest = write_manifest(tmp_path / "sub" / f"m.{fmt}", rows)
    records = read_manifest(manifest)
    assert [r.path for r in records] == [str(tmp_path / "sub/clips/a.mp4"), "/data/b.MKV", str(tmp_path / "c.webm")]
    assert [r.caption for r in records] == ["a cat", "a dog", "a bird"]
    assert [(r.start, r.end) for r in records] == [(None, None), (1.5, 4.0), (0.0, None)]
    assert [r.source_row for r in records] == [0, 1, 2]
    assert {r.source for r in records} == {str(manifest)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_configurable_columns_and_optional_times(tmp_path, fmt):
    manifest = write_manifest(tmp_path / f"m.{fmt}", [{"file": "x.mp4", "text": "hello", "t0": "2", "t1": "3"}])
    (record,) = read_manifest(manifest, video_column="file", caption_column="text", start_column="t0",
                              end_column="t1")
    assert (record.path, record.caption, record.start, record.end) == (str(tmp_path / "x.mp4"), "hello", 2.0, 3.0)
    # Without start/end columns at all, the whole video is used.
    (record,) = read_manifest(manifest, video_column="file", caption_column="text")
    assert (record.start, record.end) == (None, None)


def _error(tmp_path, fmt, rows, **kwargs) -> ManifestError:
    manifest = write_manifest(tmp_path / f"bad.{fmt}", rows)
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, **kwargs)
    assert str(manifest) in str(info.value)
    return info.value


GOOD = {"video": "a.mp4", "caption": "fine", "start": "", "end": ""}
BAD_ROWS = {  # name -> (second row, column named, words the message must hold)
    "empty caption": ({**GOOD, "caption": "  "}, "caption", "empty caption"),
    "non-numeric start": ({**GOOD, "start": "abc"}, "start", "not a number"),
    "negative start": ({**GOOD, "start": "-1"}, "start", ">= 0"),
    "end before start": ({**GOOD, "start": "3", "end": "2"}, "end", "end 2.0 <= start 3.0"),
    "end equals start": ({**GOOD, "start": "3", "end": "3"}, "end", "<= start"),
    "unknown extension": ({**GOOD, "video": "b.docx"}, "video", "unknown video extension '.docx'"),
    "no extension": ({**GOOD, "video": "b"}, "video", "unknown video extension"),
    "empty path": ({**GOOD, "video": ""}, "video", "empty"),
    "unknown scheme": ({**GOOD, "video": "ftp://host/b.mp4"}, "video", "unknown storage scheme ftp://"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_row_and_column(tmp_path, fmt, case):
    bad, column, words = BAD_ROWS[case]
    error = _error(tmp_path, fmt, [GOOD, bad])
    assert (error.row, error.column) == (1, column)
    assert "row 1" in str(error) and repr(column) in str(error) and words in str(error)
    if fmt != "parquet":  # text formats also say which line of the file
        assert error.line == (3 if fmt == "csv" else 2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("column", ["video", "caption"])
def test_missing_column(tmp_path, fmt, column):
    row = {k: v for k, v in GOOD.items() if k != column}
    error = _error(tmp_path, fmt, [row])
    assert error.column == column
    assert "missing column" in str(error) and f"pass {column}_column=" in str(error)


def test_renamed_column_that_is_absent(tmp_path):
    error = _error(tmp_path, "csv", [GOOD], caption_column="text")
    assert error.column == "text" and "columns present: video, caption, start, end" in str(error)


def test_jsonl_syntax_errors(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(GOOD) + "\n\n{not json\n")
    with pytest.raises(ManifestError, match=r"row 1 \(line 3\): invalid JSON"):
        read_manifest(manifest)
    manifest.write_text(json.dumps(GOOD) + "\n[1, 2]\n")
    with pytest.raises(ManifestError, match="expected a JSON object per line, got list"):
        read_manifest(manifest)
    manifest.write_text(json.dumps({**GOOD, "caption": 7}) + "\n")
    with pytest.raises(ManifestError, match="caption 7 is not text"):
        read_manifest(manifest)


def test_csv_row_with_too_many_cells(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("video,caption\na.mp4,ok\nb.mp4,ok,extra\n")
    with pytest.raises(ManifestError, match=r"row 1 \(line 3\): 3 cells but the header has 2 columns"):
        read_manifest(manifest)


def test_whole_file_problems(tmp_path):
    with pytest.raises(ManifestError, match="unknown manifest type '.txt'"):
        read_manifest(tmp_path / "m.txt")
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "absent.csv")
    (tmp_path / "empty.csv").write_text("video,caption\n")
    with pytest.raises(ManifestError, match="no records"):
        read_manifest(tmp_path / "empty.csv")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ManifestError, match="cannot read Parquet"):
        read_manifest(tmp_path / "broken.parquet")
    (tmp_path / "latin1.csv").write_bytes("video,caption\na.mp4,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_manifest(tmp_path / "latin1.csv")


def test_video_folder(tmp_path):
    for rel, caption in [("b.mp4", "second"), ("a.webm", " first\n"), ("nested/c.MKV", "third")]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
        (tmp_path / rel).with_suffix(".txt").write_text(caption)
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.mp4").write_bytes(b"")  # hidden folders are skipped
    records = read_video_folder(tmp_path)
    assert [Path(r.path).relative_to(tmp_path).as_posix() for r in records] == ["a.webm", "b.mp4", "nested/c.MKV"]
    assert [r.caption for r in records] == ["first", "second", "third"]
    assert [r.source_row for r in records] == [0, 1, 2] and records[0].source == str(tmp_path)
    assert load_records(tmp_path) == records
    assert load_records(tmp_path, video_column="video") == records  # defaults are harmless
    with pytest.raises(ManifestError, match="apply to manifest files"):
        load_records(tmp_path, video_column="file")


def test_video_folder_errors(tmp_path):
    with pytest.raises(ManifestError, match="no videos"):
        read_video_folder(tmp_path)
    (tmp_path / "a.mp4").write_bytes(b"")
    with pytest.raises(ManifestError, match=r"a\.mp4, row 0, column 'caption': no caption file a\.txt"):
        read_video_folder(tmp_path)
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(ManifestError, match="empty caption in a.txt"):
        read_video_folder(tmp_path)
    with pytest.raises(ManifestError, match="not found"):
        read_video_folder(tmp_path / "absent")


def test_load_records_picks_the_reader(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"file": "a.mp4", "caption": "x"}])
    assert load_records(manifest, video_column="file")[0].path == str(tmp_path / "a.mp4")


def test_video_record_validation():
    with pytest.raises(ValueError, match="must be absolute"):
        VideoRecord(path="a.mp4", caption="x", source_row=0, source="m.csv")
    with pytest.raises(ValueError, match="end must come after start"):
        VideoRecord(path="/a.mp4", caption="x", start=2.0, end=1.0, source_row=0, source="m.csv")
    with pytest.raises(ValueError, match="caption"):
        VideoRecord(path="/a.mp4", caption="", source_row=0, source="m.csv")


def test_manifest_error_survives_pickling():
    error = ManifestError("empty caption", file="/m.csv", row=4, column="caption", line=6)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.row, copy.column, copy.line) == (str(error), 4, "caption", 6)
