"""The real side of FVD for one protocol: from the cache when it holds it, else computed by every rank.

Rank 0 decides (its view of the cache is the one that counts, also when ranks sit on nodes with their
own home folders) and tells the others; computing splits the clips across ranks and sums the statistics.
"""

from __future__ import annotations

import torch

from pipeline.eval.fvd import FEATURE_DIM, FeatureStats, i3d_features, network_fingerprint
from pipeline.eval.real import (
    RealStatsMismatch,
    cache_path,
    decode_real,
    default_cache_dir,
    list_real_clips,
    load_stats,
    save_stats,
    stats_fingerprint,
)

REAL_BATCH = 8


def real_statistics(config, world, i3d, *, frames: int, height: int, width: int, fps: float) -> dict:
    """{"stats", "fingerprint", "source": cache|file|computed, "path", "used", "failures"} (on every rank)."""
    from pipeline.eval.config import EvalError

    num_real = config.num_real or config.num_videos
    clips, clips_hash = list_real_clips(config.real, num_real)
    fingerprint = stats_fingerprint(clips=clips_hash, num_real=len(clips), network=network_fingerprint(i3d),
                                    resolution=config.fvd_resolution, frames=frames, height=height, width=width,
                                    fps=fps)
    path = config.real_stats or cache_path(config.real_stats_dir or default_cache_dir(), fingerprint)
    decision = None
    if world.rank == 0:
        try:
            found = load_stats(path, fingerprint)
            decision = {"flat": found[0].to_tensor(), "info": found[1]} if found else {"flat": None}
        except RealStatsMismatch as err:
            decision = {"error": str(err)}
    decision = world.broadcast(decision)
    if "error" in decision:
        raise EvalError(decision["error"])
    source = "file" if config.real_stats else "cache"
    if decision["flat"] is not None:
        info = decision["info"]
        stats = FeatureStats.from_tensor(decision["flat"], FEATURE_DIM)
    else:
        stats, failures = _compute(config, world, i3d, clips, frames=frames, height=height, width=width, fps=fps)
        info = {"used": stats.count, "failures": failures}
        if world.rank == 0:
            save_stats(path, stats, fingerprint, info)
        source = "computed"
    if stats.count < 2:
        raise EvalError(f"--real {config.real}: only {stats.count} of {len(clips)} real clips could be decoded at "
                        f"{frames} frames of {height}x{width} at {fps:g} fps; failures: {info['failures'][:3]}")
    return {"stats": stats, "fingerprint": fingerprint, "source": source, "path": str(path),
            "used": stats.count, "failures": info.get("failures", [])}


def _compute(config, world, i3d, clips, *, frames: int, height: int, width: int, fps: float):
    from tqdm import tqdm

    from pipeline.data.decode.container import DecodeError

    stats = FeatureStats.empty()
    failures = []
    batch: list[torch.Tensor] = []
    mine = [clips[i] for i in world.share(len(clips))]
    bar = tqdm(total=len(mine), unit="clip", disable=not (config.progress and world.rank == 0),
               desc=f"real clips (rank 0 of {world.size}, {len(clips)} in all)")
    for n, clip in enumerate(mine):
        try:
            batch.append(decode_real(clip, frames=frames, height=height, width=width, fps=fps))
        except DecodeError as err:  # recorded and skipped: one broken file never stops the evaluation
            failures.append({"path": clip.path, "reason": err.reason, "message": err.message[:300]})
        if batch and (len(batch) == REAL_BATCH or n == len(mine) - 1):
            stats.add(i3d_features(i3d, torch.stack(batch), resolution=config.fvd_resolution))
            batch = []
        bar.update(1)
    bar.close()
    total = FeatureStats.from_tensor(world.sum(stats.to_tensor()), FEATURE_DIM)
    failures = [f for part in world.gather(failures) for f in part]
    return total, failures
