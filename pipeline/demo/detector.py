"""Scores generated moving-shape videos against their captions, with no learned parts.

For one video (uint8 frames (T, H, W, 3), a float video (3, T, H, W) in [-1, 1], or an MP4 path):

1. Background: the per-channel median of all pixels (the object covers a small part of the frame).
2. Foreground weight per pixel: its RGB distance to the background mapped linearly from 0 at `lo` to 1
   at `hi`. Both thresholds rise with the strongest difference in the video, so dim generated objects
   are still found and faint noise is not.
3. Colour: the palette colour nearest in hue to the weighted mean colour of the foreground. Hue is
   the angle in the opponent plane (r - (g + b) / 2, (g - b) * sqrt(3) / 2); it ignores brightness and
   added grey, so anti-aliased edges, a grey background and under-saturated generations keep it, and
   pixel noise cancels in the mean. Confidence = the share of per-pixel hue votes that agree. A
   foreground whose mean hue vector is no longer than noise would give (grey, white, or only noise)
   has no colour (None).
4. Direction: the weighted centroid of the foreground in each frame; a least-squares line through the
   centroids over time gives the displacement (dx, dy) from first to last frame; the axis with the
   larger |displacement| and its sign name the direction (y grows downwards: "up" is dy < 0).
   Under `min_motion` pixels it is "static" (None): a still object never counts as right.

Random-noise videos land near chance (see tests/unit/test_detector.py); a black video gets None for
both and counts as wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.demo.shapes import DEFAULT_COLOURS, DIRECTIONS, PALETTE, parse_caption
from pipeline.media import read_video, to_uint8_frames

_LO, _HI = 30.0, 60.0  # smallest foreground thresholds (RGB distance, 0..441)
_MIN_MASS = 0.5  # foreground weight a frame needs for its centroid to count
_MIN_COHERENCE = 3.0  # hue signal over noise (in random-walk units) needed to name a colour


@dataclass(frozen=True, kw_only=True)
class Detection:
    """What the detector saw in one video."""

    colour: str | None
    """Palette colour nearest in hue to the object, None when no (coloured) foreground was found."""
    direction: str | None
    """"left", "right", "up" or "down"; None when nothing moved at least `min_motion` pixels."""
    confidence: float
    """colour_confidence * direction_confidence, in [0, 1]."""
    colour_confidence: float
    """Share of the foreground votes won by `colour`."""
    direction_confidence: float
    """How cleanly the motion follows one axis and how far it goes, in [0, 1]."""
    displacement: tuple[float, float]
    """(dx, dy) in pixels of the fitted centroid path from the first to the last frame."""


def _as_frames(video: Any) -> np.ndarray:
    if isinstance(video, (str, os.PathLike)):
        return read_video(Path(video))
    return to_uint8_frames(video)


def _opponent(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (..., 2) opponent colour plane; its angle is the hue, its length the chroma.

    Adding grey (a dark background, desaturation) cancels out, and scaling keeps the angle.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.stack([r - (g + b) / 2, (np.sqrt(3) / 2) * (g - b)], axis=-1)


def analyse_video(
    video: Any,
    *,
    colours: Sequence[str] = DEFAULT_COLOURS,
    directions: Sequence[str] = tuple(DIRECTIONS),
    min_motion: float | None = None,
) -> Detection:
    """Measure colour and direction of motion of the object in one video (see the module docstring).

    colours / directions: the candidates. min_motion: smallest displacement in pixels that counts as
    motion; default max(1, 5% of the short side).
    """
    unknown = [c for c in colours if c not in PALETTE] + [d for d in directions if d not in DIRECTIONS]
    if unknown or not colours or not directions:
        raise ValueError(f"unknown or empty candidates {unknown}: colours from {sorted(PALETTE)}, "
                         f"directions from {sorted(DIRECTIONS)}")  # fmt: skip
    frames = _as_frames(video).astype(np.float32)  # (T, H, W, 3)
    num_frames, height, width, _ = frames.shape
    if min_motion is None:
        min_motion = max(1.0, 0.05 * min(height, width))

    background = np.median(frames.reshape(-1, 3), axis=0)  # (3,)
    distance = np.linalg.norm(frames - background, axis=-1)  # (T, H, W)
    peak = float(np.percentile(distance, 99.5))
    lo, hi = max(_LO, 0.25 * peak), max(_HI, 0.5 * peak)
    weight = np.clip((distance - lo) / (hi - lo), 0.0, 1.0)  # (T, H, W)
    mass = weight.sum(axis=(1, 2))  # (T,)
    if mass.sum() < _MIN_MASS:
        return Detection(colour=None, direction=None, confidence=0.0, colour_confidence=0.0,
                         direction_confidence=0.0, displacement=(0.0, 0.0))  # fmt: skip

    # Colour: the hue of the weighted mean opponent vector of the foreground. Noise has random hues
    # that cancel in the mean while the object's pixels add up. Confidence: the share of per-pixel
    # hue votes (weighted by chroma) that agree with the chosen colour.
    selected = weight > 0
    pixels = _opponent(frames[selected] - background)  # (P, 2)
    palette = _opponent(np.asarray([PALETTE[c] for c in colours], dtype=np.float32))  # (K, 2)
    palette_hue = np.arctan2(palette[:, 1], palette[:, 0])  # (K,)
    mean = (weight[selected, None] * pixels).sum(axis=0)  # (2,)

    def nearest_hue(vectors: np.ndarray) -> np.ndarray:
        hue = np.arctan2(vectors[..., 1], vectors[..., 0])[..., None]  # (..., 1)
        return np.argmin(np.abs(np.angle(np.exp(1j * (hue - palette_hue)))), axis=-1)

    colour_index = int(nearest_hue(mean))
    strength = weight[selected] * np.linalg.norm(pixels, axis=-1)  # (P,)
    # A grey/white object, or foreground that is only noise, has no coherent hue: the mean's length
    # is then no larger than a random walk of the same steps (sqrt of the summed squared lengths).
    hueless = np.linalg.norm(mean) <= _MIN_COHERENCE * np.sqrt((strength**2).sum()) + 1e-6
    votes = np.bincount(nearest_hue(pixels), weights=strength, minlength=len(colours))  # (K,)
    votes = votes + 1e-12  # a grey foreground has no hue: confidence 0, not a division by zero
    colour_confidence = float(votes[colour_index] / votes.sum())

    # Direction: line fit through the per-frame centroids of frames that show the object.
    valid = mass >= _MIN_MASS
    dx = dy = 0.0
    if valid.sum() >= 2:
        ys, xs = np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32)
        cx = (weight.sum(axis=1) * xs).sum(axis=1)[valid] / mass[valid]  # (T',)
        cy = (weight.sum(axis=2) * ys).sum(axis=1)[valid] / mass[valid]  # (T',)
        t = np.arange(num_frames, dtype=np.float32)[valid]
        t = t - t.mean()
        span = num_frames - 1
        dx = float((t * cx).sum() / (t * t).sum() * span)
        dy = float((t * cy).sum() / (t * t).sum() * span)
    along, across = (dx, dy) if abs(dx) >= abs(dy) else (dy, dx)
    if abs(along) < min_motion:
        direction, direction_confidence = None, 0.0
    else:
        horizontal = abs(dx) >= abs(dy)
        direction = ("right" if dx > 0 else "left") if horizontal else ("down" if dy > 0 else "up")
        purity = (abs(along) - abs(across)) / (abs(along) + abs(across))
        reach = min(1.0, abs(along) / (3 * min_motion))
        direction_confidence = float(purity * reach)
        if direction not in directions:  # motion along a direction that is not a candidate
            direction, direction_confidence = None, 0.0
    if hueless:
        colour_confidence = 0.0
    return Detection(
        colour=None if hueless else colours[colour_index],
        direction=direction,
        confidence=colour_confidence * direction_confidence,
        colour_confidence=colour_confidence,
        direction_confidence=direction_confidence,
        displacement=(dx, dy),
    )


def detect(video: Any, **options: Any) -> tuple[str | None, str | None, float]:
    """(colour, direction, confidence) of one video; options as `analyse_video`."""
    found = analyse_video(video, **options)
    return found.colour, found.direction, found.confidence


def score_detections(detections: Sequence[Detection], captions: Sequence[str]) -> dict[str, float]:
    """Compare detections with the captions they were generated from: accuracies in [0, 1]."""
    if len(detections) != len(captions):
        raise ValueError(f"got {len(detections)} detections but {len(captions)} captions; pass one each")
    if not captions:
        raise ValueError("no videos to score; pass at least one video and caption")
    specs = [parse_caption(c) for c in captions]
    colour_right = np.array([d.colour == s.colour for d, s in zip(detections, specs)])
    direction_right = np.array([d.direction == s.direction for d, s in zip(detections, specs)])
    return {
        "colour_accuracy": float(colour_right.mean()),
        "direction_accuracy": float(direction_right.mean()),
        "adherence": float((colour_right & direction_right).mean()),
        "mean_confidence": float(np.mean([d.confidence for d in detections])),
        "num_videos": float(len(captions)),
    }


def score_videos(
    videos: Iterable[Any],
    captions: Sequence[str],
    *,
    colours: Sequence[str] | None = None,
    directions: Sequence[str] = tuple(DIRECTIONS),
) -> dict[str, float]:
    """Detect colour and direction in each video and score them against its caption.

    videos: arrays (uint8 (T, H, W, 3) or float (3, T, H, W) in [-1, 1]) or MP4 paths. colours: the
    candidate colours, by default DEFAULT_COLOURS plus any other colour named in the captions. Returns
    colour_accuracy, direction_accuracy, adherence (both right), mean_confidence, num_videos and
    chance_adherence (1 / (#colours x #directions)), all floats, ready for MLflow.
    """
    if colours is None:
        named = [parse_caption(c).colour for c in captions]
        colours = tuple(DEFAULT_COLOURS) + tuple(sorted(set(named) - set(DEFAULT_COLOURS)))
    detections = [analyse_video(v, colours=colours, directions=directions) for v in videos]
    scores = score_detections(detections, captions)
    scores["chance_adherence"] = 1.0 / (len(colours) * len(directions))
    return scores
