"""What precompute's driver costs at 10M clips: planning, the resume listing, the index and totals.

Rows:
- `pomvid precompute --plan-only` on synthetic Parquet manifests (paths need not exist; captions of
  about 60 characters) of 100k, 1M and 10M rows: wall time, time per row, and the driver's peak RSS
  (and what it added to the RSS after imports), each size in a fresh process, `--repeats` times
  interleaved (100k, 1M, 10M, 100k, ...); the fastest run of each size is shown, then the time-per-row
  ratios 10M / 1M from the fastest runs and from the medians (the machine is shared: one run's wall
  time says as much about the load as about the code);
- an output with N finished shards (default 625k: 10M clips in units of 16; tiny fake files in the
  hash-prefixed folders) whose index rows were appended by the run as parts: one listing of shards/,
  the merge into index.parquet and the totals, as the end of a run does (`finish_manifest`).

Bars (issue 12, this 2-core machine): 10M rows planned in under 120 s with under 2 GiB driver RSS;
time per row at 10M no more than 1.5x that at 1M; 625k shards listed, indexed and totalled in under 60 s.

    python benchmarks/precompute_scale.py
    python benchmarks/precompute_scale.py --rows 100000 1000000 --shards 100000 --folder /tmp/scale --repeats 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the plan as `pomvid precompute --plan-only` makes it, then the peak RSS.
PLAN_CHILD = """
import json, resource, sys, time
from pipeline.data.precompute.config import PrecomputeConfig
from pipeline.data.precompute.run import run_precompute
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
config = PrecomputeConfig(manifest=sys.argv[1], output=sys.argv[2], vae="pixel", text_encoder="clip",
                          text_encoder_config={}, plan_only=True, progress=False)
began = time.perf_counter()
summary = run_precompute(config)
seconds = time.perf_counter() - began
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_kib": peak, "base_kib": base, "units": summary["work_units"],
                  "records": summary["videos_in"]}))
"""


def write_manifest(path: Path, rows: int, part_rows: int = 1_000_000) -> None:
    """A Parquet manifest of `rows` synthetic videos (columns video, caption), written in parts."""
    with pq.ParquetWriter(path, pa.schema([("video", pa.string()), ("caption", pa.string())])) as writer:
        for first in range(0, rows, part_rows):
            ids = pa.array(np.arange(first, min(rows, first + part_rows))).cast(pa.string())
            video = pc.binary_join_element_wise("/data/videos/part", ids, ".mp4", "")
            caption = pc.binary_join_element_wise("a synthetic clip of a dog running on a beach, number", ids, " ")
            writer.write_table(pa.table({"video": video, "caption": caption}))


def bench_plan(folder: Path, rows: int) -> dict:
    manifest = folder / f"manifest_{rows}.parquet"
    if not manifest.exists():
        write_manifest(manifest, rows)
    out = subprocess.run([sys.executable, "-c", PLAN_CHILD, str(manifest), str(folder / f"out_{rows}")],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["records"] == rows, result
    return result


def bench_index(folder: Path, shards: int, buckets: int = 3) -> dict:
    """N fake finished shards with their index parts, then listing + merge + totals."""
    from pipeline.data.store.index import INDEX_PARTS_DIR, finish_manifest, index_table
    from pipeline.data.store.shards import relative_shard_file

    out = folder / f"index_{shards}"
    shutil.rmtree(out, ignore_errors=True)
    ids = [f"{i:020x}"[::-1] for i in range(shards)]  # spread over the 256 prefixes like real hashes
    began = time.perf_counter()
    for prefix in {u[:2] for u in ids}:
        (out / "shards" / prefix).mkdir(parents=True)
    for unit_id in ids:
        (out / relative_shard_file(unit_id)).touch()
    (out / INDEX_PARTS_DIR).mkdir()
    for first in range(0, shards, 4096):  # as the run appends them: one part per 4096 finished units
        chunk = ids[first:first + 4096]
        table = index_table({"file": [relative_shard_file(u) for u in chunk], "unit_id": chunk,
                             "rows": [16] * len(chunk), "videos": [16] * len(chunk),
                             "clips_per_bucket": [[10, 5, 1]] * len(chunk),
                             "failures": [[{"reason": "corrupt", "count": 1}]] * len(chunk),
                             "long_captions": [0] * len(chunk), "long_caption_examples": [[]] * len(chunk)})
        pq.write_table(table, out / INDEX_PARTS_DIR / f"part-{first:09d}.parquet")
    made = time.perf_counter() - began
    manifest = {"buckets": [{"key": f"17x256x{256 + 64 * b}"} for b in range(buckets)]}
    began = time.perf_counter()
    final = finish_manifest(out, manifest, ids)  # lists shards/, merges the parts, sums the totals
    seconds = time.perf_counter() - began
    assert final["status"] == "complete" and final["totals"]["clips"] == 16 * shards, final["totals"]
    size = (out / "manifest.json").stat().st_size
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "made_s": made, "manifest_bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--shards", type=int, default=625_000)
    parser.add_argument("--folder", help="where the synthetic manifests go (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3, help="plan runs per size, interleaved")
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="precompute_scale_"))
    folder.mkdir(parents=True, exist_ok=True)
    runs: dict[int, list[dict]] = {rows: [] for rows in args.rows}
    for _ in range(args.repeats):
        for rows in args.rows:
            runs[rows].append(bench_plan(folder, rows))
    print("| rows | units | plan wall, fastest (s) | all runs (s) | us per row | driver peak RSS (MiB) "
          "| added by planning (MiB) |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for rows, results in runs.items():
        r = min(results, key=lambda x: x["seconds"])
        every = " / ".join(f"{x['seconds']:.1f}" for x in results)
        peak = max(x["peak_kib"] for x in results)
        print(f"| {rows:,} | {r['units']:,} | {r['seconds']:.1f} | {every} | {1e6 * r['seconds'] / rows:.2f} | "
              f"{peak / 1024:.0f} | {(peak - r['base_kib']) / 1024:.0f} |", flush=True)
    largest, previous = sorted(args.rows)[-1], sorted(args.rows)[-2] if len(args.rows) > 1 else None
    if previous:
        def per_row(rows, pick):
            return pick([x["seconds"] for x in runs[rows]]) / rows
        print(f"\ntime per row, {largest:,} rows / {previous:,} rows: "
              f"{per_row(largest, min) / per_row(previous, min):.2f}x (fastest runs), "
              f"{per_row(largest, statistics.median) / per_row(previous, statistics.median):.2f}x (medians)")
    if args.shards:
        r = bench_index(folder, args.shards)
        print("\n| finished shards | list + index + totals (s) | manifest.json (bytes) | making the fake shards (s) |")
        print("| ---: | ---: | ---: | ---: |")
        print(f"| {args.shards:,} | {r['seconds']:.1f} | {r['manifest_bytes']:,} | {r['made_s']:.1f} |")
    if not args.folder:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
