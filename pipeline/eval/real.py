"""Real clips for FVD: which clips, their I3D statistics, and the cache that keeps them.

The real side of FVD depends only on the clips, the network and the decoding protocol, so it is computed
once and cached in a safetensors file named by a hash of its fingerprint:

    {"clips": sha256 over (path, size, mtime, start) of the chosen clips, "num_real", "network": I3D
     weights hash, "resolution", "frames", "height", "width", "fps", "feature": definition version}

A cached file is used only when its recorded fingerprint equals the one asked for; `--real-stats FILE`
with another protocol is refused with the fields that differ. Clips are the first `num_real` videos of
a folder (recursively, sorted by path) or of a manifest (CSV/JSONL/Parquet, like precompute's). A clip
that cannot be decoded is recorded and skipped; the number actually used is part of the result.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.eval.fvd import FEATURE_DIM, FeatureStats

FEATURE_VERSION = "i3d-logits-v1"
CACHE_ENV = "POMVID_FVD_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pomvid" / "fvd_real_stats")


class RealStatsMismatch(ValueError):
    """A real-statistics file made with another protocol, clips or network."""


@dataclass(frozen=True, kw_only=True)
class RealClip:
    path: str
    start: float


def list_real_clips(source: str | os.PathLike, num_real: int) -> tuple[list[RealClip], str]:
    """The first `num_real` clips of a folder of videos or a manifest, and the fingerprint of that choice."""
    from pipeline.data.source.manifest import VIDEO_EXTENSIONS, ManifestError, read_manifest

    root = Path(source).expanduser().resolve()
    if root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        clips = [RealClip(path=str(p), start=0.0) for p in paths[:num_real]]
    elif root.is_file():
        try:
            records = read_manifest(root)
        except ManifestError as err:
            raise ValueError(f"--real {root}: {err}") from None
        clips = [RealClip(path=r.path, start=float(r.start or 0.0)) for r in records[:num_real]]
    else:
        raise FileNotFoundError(f"--real {root}: no such folder or manifest; give a folder of real videos or a "
                                "CSV/JSONL/Parquet manifest with a video column")
    if len(clips) < 2:
        raise ValueError(f"--real {root}: {len(clips)} video(s) found; FVD needs at least 2 real clips "
                         f"(extensions {' '.join(sorted(VIDEO_EXTENSIONS))})")
    digest = hashlib.sha256()
    for clip in clips:
        try:
            stat = os.stat(clip.path)
            where = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            where = "unreadable"  # recorded as a failure when decoded; part of the identity all the same
        digest.update(f"{clip.path}\t{where}\t{clip.start}\n".encode())
    return clips, digest.hexdigest()


def stats_fingerprint(*, clips: str, num_real: int, network: str, resolution: int, frames: int, height: int,
                      width: int, fps: float) -> dict:
    return {"clips": clips, "num_real": num_real, "network": network, "resolution": resolution, "frames": frames,
            "height": height, "width": width, "fps": fps, "feature": FEATURE_VERSION}


def cache_path(cache_dir: str | os.PathLike, fingerprint: dict) -> Path:
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return Path(cache_dir) / f"real_{hashlib.sha256(text.encode()).hexdigest()[:20]}.safetensors"


def load_stats(path: str | os.PathLike, fingerprint: dict) -> tuple[FeatureStats, dict] | None:
    """(stats, info) of a cached file; None when it does not exist; RealStatsMismatch when it was made
    for another fingerprint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            flat = handle.get_tensor("stats")
        recorded = json.loads(meta["fingerprint"])
        info = json.loads(meta.get("info", "{}"))
    except Exception as err:  # noqa: BLE001 - any unreadable file is refused the same way
        raise RealStatsMismatch(f"real statistics {path}: unreadable ({type(err).__name__}: {err}); delete it to "
                                "recompute") from None
    if recorded != fingerprint:
        diff = [f"{k}: {recorded.get(k)!r} != {fingerprint.get(k)!r}" for k in sorted(set(recorded) | set(fingerprint))
                if recorded.get(k) != fingerprint.get(k)]
        raise RealStatsMismatch(f"real statistics {path} were made with another protocol, clips or network "
                                f"({'; '.join(diff)}); use another file (or leave --real-stats out to use the cache "
                                "folder) so results with different protocols are never mixed")
    return FeatureStats.from_tensor(flat, FEATURE_DIM), info


def save_stats(path: str | os.PathLike, stats: FeatureStats, fingerprint: dict, info: dict) -> Path:
    """Write atomically (a reader sees the old file or the new one)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({"stats": stats.to_tensor()}, str(tmp),
              metadata={"fingerprint": json.dumps(fingerprint, sort_keys=True), "info": json.dumps(info)})
    os.replace(tmp, path)
    return path


def decode_real(clip: RealClip, *, frames: int, height: int, width: int, fps: float) -> torch.Tensor:
    """(3, T, H, W) float in [-1, 1]; DecodeError for a clip that cannot give it."""
    from pipeline.data.decode.video import decode_clip

    return torch.from_numpy(decode_clip(clip.path, frames=frames, height=height, width=width, fps=fps,
                                        start=clip.start))
