"""Planning without serial Python per row: streaming manifest reads, work-unit ids, finished units,
the plan files, `--plan-only`, and errors that still name the file, row and column."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as pomvid
from pipeline.data.source.manifest import ManifestError, read_manifest
from pipeline.data.source.plan import manifest_batches, plan_run
from tests.unit.test_manifest import BAD_ROWS, GOOD, write_manifest


def _rows(n: int, start: int = 0, folder: str = "v") -> list[dict]:
    return [{"video": f"{folder}/{i}.mp4", "caption": f"clip {i}", "start": "", "end": ""} for i in range(start, start + n)]


def _plan(manifest, finished=(), **kwargs):
    return plan_run(manifest, rows_per_unit=3, settings_hash="s", finished=list(finished), **kwargs)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_streamed_rows_equal_the_per_row_reader(tmp_path, fmt):
    rows = [{"video": "clips/a.mp4", "caption": " a cat ", "start": "", "end": ""},
            {"video": "/data/b.MKV", "caption": "a dog", "start": "1.5", "end": "4"},
            {"video": "../c.webm", "caption": "7", "start": "0", "end": ""}]
    if fmt != "csv":
        rows = [{**r, "start": float(r["start"]) if r["start"] else None,
                 "end": float(r["end"]) if r["end"] else None} for r in rows]
    manifest = write_manifest(tmp_path / "sub" / f"m.{fmt}", rows)
    got = pa.concat_tables(manifest_batches(manifest, batch_rows=2)).to_pylist()
    want = read_manifest(manifest)
    # Paths are normalised by the decode task (os.path.normpath), not in the driver.
    assert [os.path.normpath(g["path"]) for g in got] == [r.path for r in want]
    assert [(g["caption"], g["start"], g["end"], g["source_row"]) for g in got] == [
        (r.caption, r.start, r.end, r.source_row) for r in want]


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_row_and_column_like_the_per_row_reader(tmp_path, case):
    bad, column, words = BAD_ROWS[case]
    manifest = write_manifest(tmp_path / "bad.csv", [GOOD, bad])
    with pytest.raises(ManifestError) as info:
        _plan(manifest)
    assert (info.value.row, info.value.column, info.value.line) == (1, column, 3) and words in str(info.value)


def test_unit_ids_are_stable_local_and_settings_dependent(tmp_path):
    write_manifest(tmp_path / "a.csv", _rows(7))
    write_manifest(tmp_path / "b.csv", _rows(9))
    seven, nine = _plan(tmp_path / "a.csv").unit_ids.to_pylist(), _plan(tmp_path / "b.csv").unit_ids.to_pylist()
    assert len(seven) == 3 and seven == _plan(tmp_path / "a.csv").unit_ids.to_pylist()
    assert nine[:2] == seven[:2] and nine[2] != seven[2]  # appending rows keeps the full units before them
    other = plan_run(tmp_path / "a.csv", rows_per_unit=3, settings_hash="t", finished=[]).unit_ids.to_pylist()
    assert set(other).isdisjoint(seven)
    # Batch boundaries do not move units: a unit cut by a batch is carried into the next one.
    cut = plan_run(tmp_path / "b.csv", rows_per_unit=3, settings_hash="s", finished=[],
                   video_column="video").unit_ids.to_pylist()
    assert cut == nine


def test_folder_of_parts_finished_units_and_plan_files(tmp_path):
    parts = tmp_path / "parts"
    write_manifest(parts / "part-0.parquet", _rows(4, folder="/v"))
    write_manifest(parts / "part-1.parquet", _rows(5, start=4, folder="/v"))
    whole = write_manifest(tmp_path / "whole.parquet", _rows(9, folder="/v"))
    ids = _plan(parts).unit_ids.to_pylist()
    assert ids == _plan(whole).unit_ids.to_pylist() and len(ids) == 3  # parts read as one manifest
    out = tmp_path / "out"
    plan = _plan(parts, finished=[ids[1], "an-old-unit"], write_to=out)
    assert (plan.records, plan.units, plan.finished, plan.pending, plan.pending_rows) == (9, 3, 1, 2, 6)
    units = pa.concat_tables(pq.read_table(f) for f in plan.plan_files)
    assert units.column("unit_id").to_pylist() == [ids[0], ids[2]]
    videos = units.column("videos").to_pylist()
    assert [v["source_row"] for v in videos[1]] == [6, 7, 8] and videos[1][0]["path"] == "/v/6.mp4"


def test_twenty_thousand_rows_plan_and_plan_only_cli(tmp_path, capsys):
    n = 20_000
    manifest = tmp_path / "big.csv"
    pacsv.write_csv(pa.table({"video": [f"/videos/{i:07d}.mp4" for i in range(n)],
                              "caption": [f"a clip number {i}" for i in range(n)]}), manifest)
    began = time.perf_counter()
    plan = plan_run(manifest, rows_per_unit=16, settings_hash="s", finished=[])
    seconds = time.perf_counter() - began
    assert (plan.records, plan.units, plan.pending_rows) == (n, 1250, n)
    assert seconds < 10, f"planning {n} rows took {seconds:.1f} s"  # benchmarks/precompute_scale.py measures
    out = tmp_path / "out"
    args = ["precompute", "--manifest", str(manifest), "--out", str(out), "--vae", "pixel", "--text-encoder", "clip",
            "--text-encoder-config", "{}", "--plan-only"]
    assert pomvid(args) == 0
    printed = capsys.readouterr().out
    assert "videos in         20000" in printed and "to do             1250  (20000 videos)" in printed
    assert not out.exists()  # nothing written, nothing started


def test_video_paths_on_object_storage(tmp_path):
    """Relative paths of a manifest on object storage resolve against its prefix (the key folded like a
    path), absolute s3:// paths stay, and a scheme pyarrow cannot read is refused with the row."""
    from pipeline.data.source.manifest import normalize_video_path
    from pipeline.data.source.plan import _checked_rows

    table = pa.table({"video": ["clips/a.mp4", "../other/b.mp4", "s3://elsewhere/c.mp4", "/local/d.mp4"],
                      "caption": ["a", "b", "c", "d"]})
    cols = {"video": "video", "caption": "caption", "start": "start", "end": "end"}
    paths = _checked_rows(table, cols, "s3://bucket/data").column("path").to_pylist()
    assert [normalize_video_path(p) for p in paths] == [
        "s3://bucket/data/clips/a.mp4", "s3://bucket/other/b.mp4", "s3://elsewhere/c.mp4", "/local/d.mp4"]
    with pytest.raises(ValueError):
        _checked_rows(pa.table({"video": ["ftp://host/e.mp4"], "caption": ["e"]}), cols, "/data")
    manifest = write_manifest(tmp_path / "m.csv", [{**GOOD, "video": "http://host/e.mp4"}])
    with pytest.raises(ManifestError, match="unknown storage scheme http://") as info:
        list(manifest_batches(manifest))
    assert info.value.row == 0 and info.value.column == "video"
