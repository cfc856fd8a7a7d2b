"""How fast the latent loader delivers batches, with and without background prefetch.

Rows, per size (a synthetic store written with the real shard writer, float16, 16 clips per shard,
read from the page cache as a node-local disk would be after the first epoch):
- demo: latents 12x8x8x8 and text 16x32 per sample (`pomvid demo`), batch 16;
- S: latents 16x13x32x32 and text 120x4096 per sample (about 1.4 MB), batch 8;
samples/s of a consumer that takes batches as fast as they come (prefetch 0 = read in the step, as
before; prefetch 4 on 2 threads), and, for a consumer that spends `step` seconds on each batch (the
training step: S at 270 samples/s = one H100, the issue's figure), the share of the time it waited
for data after the first batch (the trainer logs that wait as perf/data_wait_s).

Bars (issue 12, this 2-core machine): at least 300 samples/s per process at S sizes; the step's data
wait under 2% of the step after the first.

    python benchmarks/loader_throughput.py
    python benchmarks/loader_throughput.py --samples-s 256 --seconds 5
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.data.load.loader import LatentDataset, LatentLoader
from pipeline.data.store.index import finish_manifest
from pipeline.data.store.shards import ShardRow, shard_path, shard_table, write_shard

SIZES = {  # name: (latent shape, text (L, D), per-rank batch, step seconds of one batch)
    "demo": ((12, 8, 8, 8), (16, 32), 16, 16 / 114),  # the demo's step needs 114 samples/s
    "S": ((16, 13, 32, 32), (120, 4096), 8, 8 / 270),  # one H100 consumes about 270 samples/s
}


def make_store(root: Path, samples: int, latent: tuple, text: tuple, per_shard: int = 16) -> Path:
    rng = np.random.default_rng(0)
    key = "x".join(str(v) for v in (latent[1] * 4 - 3, latent[2] * 8, latent[3] * 8))
    unit_ids = []
    for s in range(0, samples, per_shard):
        rows = [ShardRow(id=f"c{n}", caption=f"caption {n}", latent=rng.standard_normal(latent, np.float32),
                         text=rng.standard_normal(text, np.float32), source_path=f"/v/{n}.mp4", source_row=n,
                         clip_start=0.0, clip_end=1.0, fps=8.0, bucket=key)
                for n in range(s, min(samples, s + per_shard))]
        unit_id = f"{s:08x}"[::-1]
        meta = {"unit_id": unit_id, "videos": len(rows), "buckets": {key: len(rows)}, "failures": {}}
        write_shard(shard_path(root, unit_id), shard_table(rows, storage_dtype="float16", metadata=meta))
        unit_ids.append(unit_id)
    finish_manifest(root, {"buckets": [{"key": key, "latent_shape": list(latent)}]}, unit_ids)
    return root


def rate(root: Path, batch: int, prefetch: int, seconds: float) -> float:
    """Samples per second of a consumer that does nothing but take batches."""
    loader = LatentLoader(LatentDataset(root), batch_size=batch, dp_rank=0, dp_size=1, seed=0, prefetch=prefetch)
    n, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for b in loader:
            n += b["latents"].shape[0]
            if time.perf_counter() - began >= seconds:
                break
    return n / (time.perf_counter() - began)


def wait_share(root: Path, batch: int, step: float, steps: int) -> tuple[float, float]:
    """(share of the time waiting for data after the first batch, first batch's wait in s)."""
    loader = LatentLoader(LatentDataset(root), batch_size=batch, dp_rank=0, dp_size=1, seed=0, prefetch=4)
    waits, began, first = [], None, 0.0
    while len(waits) < steps:
        for _ in loader:
            wait = loader.perf_metrics()["perf/data_wait_s"]
            if began is None:
                began, first = time.perf_counter(), wait
            else:
                waits.append(wait)
            time.sleep(step)  # the training step
            if len(waits) >= steps:
                break
    return sum(waits) / (time.perf_counter() - began), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples-demo", type=int, default=2048)
    parser.add_argument("--samples-s", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=4.0, help="per throughput row")
    parser.add_argument("--steps", type=int, default=100, help="training steps per data-wait row")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="loader_throughput_"))
    try:
        print("| size | bytes per sample | batch | samples/s, prefetch 0 | samples/s, prefetch 4 (2 threads) "
              "| step (ms) | data wait after the first batch | first batch wait (ms) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, count in (("demo", args.samples_demo), ("S", args.samples_s)):
            latent, text, batch, step = SIZES[name]
            root = make_store(folder / name, count, latent, text)
            per_sample = 2 * (int(np.prod(latent)) + int(np.prod(text)))
            rate(root, batch, 4, 1.0)  # warm the page cache
            sync, ahead = rate(root, batch, 0, args.seconds), rate(root, batch, 4, args.seconds)
            share, first = wait_share(root, batch, step, args.steps)
            print(f"| {name} | {per_sample:,} | {batch} | {sync:,.0f} | {ahead:,.0f} | {1000 * step:.1f} | "
                  f"{100 * share:.2f}% | {1000 * first:.1f} |", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
