"""Shard store: byte encoding of arrays, shard schema and round trip, atomic writes, manifest, errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import storage
from pipeline.data.store import index as I  # noqa: E741 - I for index, like S for shards
from pipeline.data.store import shards as S
from tests.latent_store import make_latent_output


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_array_bytes_round_trip(dtype):
    x = torch.randn(2, 3, 4, 5) * 10
    buf = S.array_to_bytes(x, dtype)
    assert len(buf) == x.numel() * (4 if dtype == "float32" else 2)
    back = S.bytes_to_tensor(buf, (2, 3, 4, 5), dtype)
    assert back.dtype == torch.float32
    assert torch.equal(back, x.to(S.STORAGE_DTYPES[dtype]).float())  # exactly the cast, nothing else
    assert torch.equal(S.bytes_to_tensor(S.array_to_bytes(x.numpy(), dtype), x.shape, dtype), back)


def test_bytes_errors_name_the_problem():
    with pytest.raises(ValueError, match="storage dtype 'int8'"):
        S.array_to_bytes(np.zeros(3), "int8")
    with pytest.raises(S.ShardError, match="3 stored values do not fill shape"):
        S.bytes_to_tensor(S.array_to_bytes(np.zeros(3), "float32"), (2, 2), "float32")


def _rows(n, bucket="5x16x16"):
    return [
        S.ShardRow(id=f"c{i}", caption=f"a caption {i}", latent=np.full((4, 2, 2, 2), i, np.float32),
                   text=np.arange(3 * (i + 1), dtype=np.float32).reshape(i + 1, 3), source_path=f"/v/{i}.mp4",
                   source_row=i, clip_start=0.5 * i, clip_end=0.5 * i + 1, fps=8.0, bucket=bucket)
        for i in range(n)
    ]


def test_shard_round_trip_schema_and_row_groups(tmp_path):
    path = S.shard_path(tmp_path, "u1")
    meta = {"unit_id": "u1", "videos": 3, "buckets": {"5x16x16": 3}, "failures": {"corrupt": 1}}
    S.write_shard(path, S.shard_table(_rows(3), storage_dtype="float16", metadata=meta))
    assert path.parent.parent.name == "shards" and path.parent.name == "u1"  # hash-prefixed sub-folder
    assert sorted(p.name for p in path.parent.iterdir()) == ["u1.parquet"]
    pf = pq.ParquetFile(path)
    assert pf.schema_arrow.remove_metadata().equals(S.SHARD_SCHEMA)
    assert pf.num_row_groups == 3  # one row per row group: a reader fetches one sample alone
    assert S.read_shard_metadata(path) == {**meta, "rows": 3}
    samples = S.read_samples(path)
    for i, s in enumerate(samples):
        assert s["id"] == f"c{i}" and s["caption"] == f"a caption {i}" and s["bucket"] == "5x16x16"
        assert s["latent"].shape == (4, 2, 2, 2) and torch.all(s["latent"] == i)
        assert torch.equal(s["text"], torch.arange(3 * (i + 1), dtype=torch.float32).reshape(i + 1, 3))
        assert (s["source_path"], s["source_row"], s["clip_start"], s["clip_end"], s["fps"]) == (
            f"/v/{i}.mp4", i, 0.5 * i, 0.5 * i + 1, 8.0)
    table = S.read_shard(path)
    assert table.column("latent_dtype").to_pylist() == ["float16"] * 3
    assert table.column("text_length").to_pylist() == [1, 2, 3]
    assert table.column("latent_shape").to_pylist() == [[4, 2, 2, 2]] * 3


def test_shard_table_rejects_bad_shapes():
    row = _rows(1)[0]
    row.latent = np.zeros((2, 2))
    with pytest.raises(ValueError, match="clip c0: latent must be"):
        S.shard_table([row], storage_dtype="float32", metadata={})


def test_atomic_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    S.write_json_atomic(path, {"a": 1})

    def fails(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        storage.put_written(path, fails)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_unreadable_shard_names_the_file(tmp_path):
    bad = tmp_path / "shards" / "u.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"not parquet")
    with pytest.raises(S.ShardError, match="u.parquet: not a readable shard"):
        S.read_shard_metadata(bad)
    with pytest.raises(S.ShardError, match="u.parquet: not a readable shard"):
        S.read_shard(bad)


def test_errors_files(tmp_path):
    S.write_jsonl_atomic(S.errors_path(tmp_path, "b"), [{"id": "2", "path": "/x", "reason": "corrupt", "message": "m"}])
    S.write_jsonl_atomic(S.errors_path(tmp_path, "a"), [{"id": "1", "path": "/y", "reason": "missing", "message": "n"}])
    assert [e["reason"] for e in S.read_errors(tmp_path)] == ["missing", "corrupt"]
    assert S.read_errors(tmp_path / "nothing") == []


def test_manifest_round_trip_and_version_check(tmp_path):
    assert S.read_output_manifest(tmp_path) is None
    S.write_output_manifest(tmp_path, {"status": "running"})
    assert S.read_output_manifest(tmp_path) == {"status": "running", "schema_version": S.SCHEMA_VERSION}
    (tmp_path / S.MANIFEST_NAME).write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(S.ShardError, match="schema_version 99.*--overwrite"):
        S.read_output_manifest(tmp_path)
    (tmp_path / S.MANIFEST_NAME).write_text("{oops")
    with pytest.raises(S.ShardError, match="not valid JSON"):
        S.read_output_manifest(tmp_path)


def test_finish_manifest_writes_the_index_and_a_small_header(tmp_path):
    manifest = make_latent_output(tmp_path, [[("5x16x16", 1)] * 3, [("5x16x16", 1), ("9x16x16", 2)]])
    assert manifest["status"] == "complete" and "shards" not in manifest and manifest["index"] == I.INDEX_NAME
    assert manifest["totals"]["clips"] == 5 and manifest["totals"]["clips_per_bucket"] == {"5x16x16": 4, "9x16x16": 1}
    index = I.read_index(tmp_path)
    assert index.schema.equals(I.INDEX_SCHEMA)
    assert index.column("file").to_pylist() == ["shards/un/unit0000.parquet", "shards/un/unit0001.parquet"]
    assert index.column("rows").to_pylist() == [3, 2] and index.column("clips_per_bucket").to_pylist() == [[3, 0], [1, 1]]
    assert not (tmp_path / I.INDEX_PARTS_DIR).exists()
    partial = I.finish_manifest(tmp_path, {"buckets": manifest["buckets"]}, ["unit0001", "unit0009"])  # 0009 unfinished
    assert partial["status"] == "incomplete" and I.read_index(tmp_path).column("unit_id").to_pylist() == ["unit0001"]


def test_index_merges_parts_footers_and_earlier_rows_in_unit_order(tmp_path):
    make_latent_output(tmp_path, [[("5x16x16", 1)]] * 4)  # unit0000..unit0003, index.parquet holds all four
    keys = ["5x16x16"]
    appender = I.IndexAppender(tmp_path, every_rows=1)
    row = I.footer_rows(tmp_path, ["unit0002"], keys)
    appender.add(row.set_column(3, "videos", pa.array([7])))  # a later row for unit0002 wins over the old one
    assert len(list((tmp_path / I.INDEX_PARTS_DIR).iterdir())) == 1
    (tmp_path / I.INDEX_NAME).unlink()  # as if killed before any index existed: rows come from the footers
    finished, leftovers = I.list_output(tmp_path)
    assert sorted(finished) == ["unit0000", "unit0001", "unit0002", "unit0003"] and leftovers == []
    index = I.build_index(tmp_path, ["unit0003", "unit0002", "unit0000", "unit0001"], finished, keys)
    assert index.column("unit_id").to_pylist() == ["unit0003", "unit0002", "unit0000", "unit0001"]
    assert index.column("videos").to_pylist() == [1, 7, 1, 1]
    totals = I.index_totals(index, keys, 5)
    assert (totals["shards"], totals["videos"], totals["clips"], totals["work_units"]) == (4, 10, 4, 5)


def test_old_output_with_a_json_shard_list_is_refused_clearly(tmp_path):
    (tmp_path / S.MANIFEST_NAME).write_text(json.dumps({"schema_version": 1, "status": "complete", "shards": []}))
    with pytest.raises(S.ShardError, match="older pomvid.*JSON list of shards.*--overwrite"):
        S.read_output_manifest(tmp_path)
