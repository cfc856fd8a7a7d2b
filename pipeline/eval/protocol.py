"""The evaluation protocol: everything that changes an FVD or CLIP score, and its short id.

FVD numbers are only comparable when the protocol is the same: number of videos and real clips, frames,
resolution, fps, seeds, prompts, sampler steps and guidance, the networks (by weight hash) and the real
clips (by fingerprint). Every result carries its protocol; `protocol_id` hashes the identity fields so
results with different protocols land under different names (`eval/<id>/fvd`, see pipeline/eval/log.py)
and in different rows of `pomvid runs compare`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

# Bump when the feature definition or score formula changes: old results then get another id.
PROTOCOL_VERSION = 1


def text_hash(items: list[str]) -> str:
    """sha256 of a list of strings (order matters)."""
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def describe_seeds(seeds: list[int]) -> str:
    """"0..63" for consecutive seeds, else the list (a hash past 16 entries)."""
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}..{seeds[-1]}"
    if len(seeds) <= 16:
        return ",".join(str(s) for s in seeds)
    return "sha256:" + text_hash([str(s) for s in seeds])[:16]


@dataclass(kw_only=True)
class EvalProtocol:
    """How the videos were made and scored. Every field is part of the identity."""

    num_videos: int
    """Generated videos."""
    frames: int
    """Frames per video (generated and real)."""
    height: int
    """Video height in pixels (real clips are resized and centre-cropped to it)."""
    width: int
    """Video width in pixels."""
    fps: float
    """Frame rate of the videos; real clips are resampled to it."""
    seeds: str
    """Noise seeds, e.g. "0..63" (video i uses seed 0 + i)."""
    prompts: str
    """sha256 of the prompt list (video i uses prompt i modulo the list)."""
    num_prompts: int
    """Distinct prompts."""
    steps: int
    """Sampler steps."""
    guidance: float
    """Classifier-free guidance scale."""
    shift: float
    """Timestep shift of the sampler's schedule."""
    solver: str
    """ODE solver."""
    sequential: bool
    """Frame-sequential generation (block-causal models)."""
    clip: dict | None = None
    """CLIP score: {"model": weights/config hash, "image_size"}; None when no CLIP model was given."""
    fvd: dict | None = None
    """FVD: {"network": I3D weights hash, "resolution", "real": clips fingerprint, "num_real"}; None without."""
    version: int = PROTOCOL_VERSION
    """Version of the scoring code's definitions."""
    extra: dict = field(default_factory=dict)
    """Other identity fields (kept for forward compatibility)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def id(self) -> str:
        """8 hex characters of the sha256 of the identity fields."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def summary(self) -> str:
        """One line a person reads: "64 videos 16x256x256@8fps seeds 0..63 steps 30 cfg 3 fvd@224 real 2048"."""
        parts = [f"{self.num_videos} videos {self.frames}x{self.height}x{self.width}@{self.fps:g}fps",
                 f"seeds {self.seeds}", f"{self.num_prompts} prompts", f"{self.solver} {self.steps} steps",
                 f"cfg {self.guidance:g}"]
        if self.shift != 1.0:
            parts.append(f"shift {self.shift:g}")
        if self.sequential:
            parts.append("sequential")
        if self.fvd:
            parts.append(f"fvd i3d:{self.fvd['network'][:8]}@{self.fvd['resolution']} real {self.fvd['num_real']} "
                         f"({self.fvd['real'][:8]})")
        if self.clip:
            parts.append(f"clip:{self.clip['model'][:8]}")
        return ", ".join(parts)


def summary_of(protocol: dict) -> str:
    """`EvalProtocol.summary` of a protocol read back as a dict (from JSON or an MLflow tag)."""
    known = {k: v for k, v in protocol.items() if k in EvalProtocol.__dataclass_fields__}
    try:
        return EvalProtocol(**known).summary()
    except TypeError:  # written by another version: show what there is
        return json.dumps(protocol, sort_keys=True)[:200]
