"""A captioned synthetic video data set: coloured shapes moving in one of four directions.

Each video shows one shape ("a red square moving left") on a black or dark background. Start position,
size and speed are drawn per sample, so a model has to learn motion rather than memorise clips. Some
colour/direction pairs are held out of training (`held_out_pairs`): each held-out colour and direction is
still seen in training with other partners, so generating the held-out captions tests composition.

Everything is deterministic from `ShapesConfig.seed`: sample i draws from its own generator seeded with
(seed, i), so the first n samples are the same whatever the total count.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Saturated colours whose hues are far apart, so the detector separates them even after H.264's
# chroma subsampling; they stay bright against a dark background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 210, 40),
    "blue": (40, 80, 255),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 220),
}
SHAPES = ("square", "circle", "triangle")
# Unit displacement per direction in image coordinates (x to the right, y downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DEFAULT_COLOURS = ("red", "green", "blue", "yellow")
SPLITS = ("train", "held_out", "all")
_SUPERSAMPLE = 4  # sub-pixels per pixel side: smooth edges and sub-pixel motion


@dataclass(frozen=True, kw_only=True)
class ShapeSpec:
    """What one video shows; `caption` is its text."""

    colour: str
    """A key of PALETTE."""
    shape: str
    """One of SHAPES."""
    direction: str
    """A key of DIRECTIONS."""

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


def parse_caption(caption: str) -> ShapeSpec:
    """Inverse of ShapeSpec.caption: "a red square moving left" -> ShapeSpec(red, square, left)."""
    words = caption.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"caption {caption!r} is not of the form 'a <colour> <shape> moving <direction>'")
    _, colour, shape, _, direction = words
    if colour not in PALETTE or shape not in SHAPES or direction not in DIRECTIONS:
        raise ValueError(
            f"caption {caption!r}: colour must be one of {sorted(PALETTE)}, shape one of {SHAPES}, "
            f"direction one of {sorted(DIRECTIONS)}"
        )
    return ShapeSpec(colour=colour, shape=shape, direction=direction)


@dataclass(kw_only=True)
class ShapesConfig:
    """How the moving-shapes videos are made."""

    frames: int = 16
    """Frames per video (at least 2: motion needs two frames)."""
    height: int = 32
    """Frame height in pixels."""
    width: int = 32
    """Frame width in pixels."""
    fps: float = 8.0
    """Frame rate written into the MP4s."""
    colours: tuple[str, ...] = DEFAULT_COLOURS
    """Colours used, keys of PALETTE."""
    shapes: tuple[str, ...] = ("square", "circle")
    """Shapes used, from SHAPES."""
    directions: tuple[str, ...] = ("left", "right", "up", "down")
    """Directions used, keys of DIRECTIONS."""
    min_size: float = 0.2
    """Smallest object side, as a fraction of the frame's short side."""
    max_size: float = 0.3
    """Largest object side, as a fraction of the frame's short side."""
    min_travel: float = 0.5
    """Shortest path from first to last frame, as a fraction of the free room along the motion axis."""
    max_travel: float = 1.0
    """Longest path from first to last frame, as a fraction of that room (1.0 = wall to wall)."""
    background_max: int = 0
    """Each video's background is a grey level drawn from [0, background_max]; 0 = always black."""
    held_out: int = 4
    """Colour/direction pairs held out of training (at most min(#colours, #directions))."""
    holdout_seed: int = 0
    """Seed choosing which pairs are held out (independent of `seed`)."""
    seed: int = 0
    """Seed of the samples: positions, sizes, speeds, background levels, order of captions."""

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"ShapesConfig.frames={self.frames}: need at least 2 frames to show motion")
        if self.height < 8 or self.width < 8:
            raise ValueError(f"ShapesConfig.height/width={self.height}x{self.width}: use at least 8x8 pixels")
        if not self.fps > 0:
            raise ValueError(f"ShapesConfig.fps={self.fps}: must be positive")
        for name, values, allowed in (
            ("colours", self.colours, tuple(PALETTE)),
            ("shapes", self.shapes, SHAPES),
            ("directions", self.directions, tuple(DIRECTIONS)),
        ):
            values = tuple(values)
            setattr(self, name, values)
            unknown = [v for v in values if v not in allowed]
            if not values or unknown or len(set(values)) != len(values):
                raise ValueError(
                    f"ShapesConfig.{name}={values}: give distinct values from {allowed} (unknown: {unknown})"
                )
        if not 0 < self.min_size <= self.max_size < 0.8:
            raise ValueError(
                f"ShapesConfig.min_size={self.min_size}, ShapesConfig.max_size={self.max_size}: need "
                "0 < min_size <= max_size < 0.8 (fractions of the short side)"
            )
        if min(self.height, self.width) * self.min_size < 2:
            raise ValueError(
                f"ShapesConfig.min_size={self.min_size} makes objects under 2 pixels at "
                f"{self.height}x{self.width}; raise min_size or the frame size"
            )
        if not 0 < self.min_travel <= self.max_travel <= 1:
            raise ValueError(
                f"ShapesConfig.min_travel={self.min_travel}, ShapesConfig.max_travel={self.max_travel}: need "
                "0 < min_travel <= max_travel <= 1"
            )
        if not 0 <= self.background_max <= 64:
            raise ValueError(
                f"ShapesConfig.background_max={self.background_max}: must be in [0, 64] "
                "(the background must stay dark)"
            )
        limit = min(len(self.colours), len(self.directions))
        if not 0 <= self.held_out <= limit or (self.held_out and limit < 2):
            raise ValueError(
                f"ShapesConfig.held_out={self.held_out}: must be in [0, {limit}] and needs at least 2 "
                "colours and 2 directions, so every colour and direction is still trained on"
            )


def held_out_pairs(
    colours: tuple[str, ...], directions: tuple[str, ...], *, count: int, seed: int = 0
) -> list[tuple[str, str]]:
    """(colour, direction) pairs to hold out of training: no colour or direction appears twice.

    So with at least two directions every colour is still trained with another direction, and vice
    versa. Deterministic for a seed.
    """
    if not 0 <= count <= min(len(colours), len(directions)):
        raise ValueError(
            f"count={count}: can hold out at most min(#colours, #directions) = "
            f"{min(len(colours), len(directions))} pairs without repeating a colour or direction"
        )
    rng = np.random.default_rng(seed)
    chosen_colours = [colours[i] for i in rng.permutation(len(colours))[:count]]
    chosen_directions = [directions[i] for i in rng.permutation(len(directions))[:count]]
    return sorted(zip(chosen_colours, chosen_directions))


def split_specs(config: ShapesConfig) -> tuple[list[ShapeSpec], list[ShapeSpec]]:
    """All colour x shape x direction combinations, split into (train, held_out)."""
    held = set(
        held_out_pairs(config.colours, config.directions, count=config.held_out, seed=config.holdout_seed)
    )
    train, held_out = [], []
    for colour in config.colours:
        for shape in config.shapes:
            for direction in config.directions:
                spec = ShapeSpec(colour=colour, shape=shape, direction=direction)
                (held_out if (colour, direction) in held else train).append(spec)
    return train, held_out


def specs_for_split(config: ShapesConfig, split: str) -> list[ShapeSpec]:
    """The combinations of one split: "train", "held_out" or "all"."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {SPLITS}")
    train, held_out = split_specs(config)
    return {"train": train, "held_out": held_out, "all": train + held_out}[split]


@dataclass(kw_only=True)
class ShapeSample:
    """One rendered video and the ground truth of its motion."""

    spec: ShapeSpec
    """Colour, shape and direction shown."""
    frames: np.ndarray = field(repr=False)
    """uint8 (T, H, W, 3)."""
    size: float
    """Object side in pixels."""
    start: tuple[float, float]
    """(x, y) of the object's centre in the first frame, in pixels."""
    velocity: tuple[float, float]
    """(dx, dy) of the centre per frame, in pixels."""
    background: int
    """Grey level of the background."""

    @property
    def caption(self) -> str:
        return self.spec.caption


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Inside-mask of a shape centred at 0 with half-side `half`, at sub-pixel offsets (dx, dy)."""
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "triangle":  # apex up, base down: half-width grows linearly from 0 to `half`
        return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_sample(spec: ShapeSpec, config: ShapesConfig, rng: np.random.Generator) -> ShapeSample:
    """Draw size, start, speed and background from `rng` and render the video."""
    height, width, frames = config.height, config.width, config.frames
    size = rng.uniform(config.min_size, config.max_size) * min(height, width)
    ux, uy = DIRECTIONS[spec.direction]
    room_x, room_y = width - size, height - size  # free room for the object's top-left corner
    room_axis = room_x if ux else room_y
    travel = rng.uniform(config.min_travel, config.max_travel) * room_axis
    # Along the axis the start leaves room for the whole path; across it, anywhere in the frame.
    along = rng.uniform(0.0, room_axis - travel)
    if ux + uy < 0:
        along += travel  # moving left/up: start on the far side
    across = rng.uniform(0.0, room_y if ux else room_x)
    corner = (along, across) if ux else (across, along)
    start = (corner[0] + size / 2, corner[1] + size / 2)
    speed = travel / (frames - 1)
    velocity = (ux * speed, uy * speed)
    background = int(rng.integers(0, config.background_max + 1))

    ss = _SUPERSAMPLE
    ys = (np.arange(height * ss) + 0.5) / ss  # sub-pixel centres, in pixels
    xs = (np.arange(width * ss) + 0.5) / ss
    colour = np.asarray(PALETTE[spec.colour], dtype=np.float32)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        cx, cy = start[0] + velocity[0] * t, start[1] + velocity[1] * t
        inside = _coverage(spec.shape, xs[None, :] - cx, ys[:, None] - cy, size / 2)  # (H*ss, W*ss)
        cover = inside.reshape(height, ss, width, ss).mean(axis=(1, 3), dtype=np.float32)  # (H, W)
        frame = background + cover[..., None] * (colour - background)  # (H, W, 3)
        out[t] = np.round(frame).astype(np.uint8)
    return ShapeSample(
        spec=spec, frames=out, size=size, start=start, velocity=velocity, background=background
    )


def make_sample(config: ShapesConfig, index: int, split: str = "train") -> ShapeSample:
    """Sample `index` of a split: its caption cycles through a seeded order of the split's combinations
    (balanced), its randomness comes from a generator seeded with (seed, split, index)."""
    specs = specs_for_split(config, split)
    if not specs:
        raise ValueError(f"split {split!r} has no combinations (held_out={config.held_out})")
    order = np.random.default_rng([config.seed, SPLITS.index(split)]).permutation(len(specs))
    spec = specs[order[index % len(specs)]]
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
    return render_sample(spec, config, rng)


def write_shapes_dataset(
    out_dir: str | os.PathLike,
    config: ShapesConfig,
    *,
    count: int,
    split: str = "train",
    workers: int = 2,
    crf: int = 12,
    absolute_paths: bool = True,
) -> Path:
    """Write `count` MP4s of a split to out_dir/videos/ and a CSV manifest out_dir/<split>.csv.

    The manifest has the columns `video` and `caption` that `pomvid precompute` reads, plus `colour`,
    `shape` and `direction` for checks. Video paths are absolute unless `absolute_paths=False` (then
    relative to out_dir). crf 12 keeps colours close to the rendered ones. Returns the manifest path.
    """
    from pipeline.media import write_mp4

    if count < 1:
        raise ValueError(f"count={count}: write at least one video")
    if workers < 1:
        raise ValueError(f"workers={workers}: must be at least 1")
    out_dir = Path(out_dir).resolve()
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    specs_for_split(config, split)  # validate the split before starting work

    def write_one(index: int) -> list[str]:
        sample = make_sample(config, index, split)
        relative = f"videos/{split}_{index:06d}.mp4"
        write_mp4(sample.frames, out_dir / relative, fps=config.fps, scale=1, crf=crf)
        video = str(out_dir / relative) if absolute_paths else relative
        return [video, sample.caption, sample.spec.colour, sample.spec.shape, sample.spec.direction]

    # ffmpeg runs in subprocesses, so threads overlap the encodes despite the GIL.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(write_one, range(count)))
    manifest = out_dir / f"{split}.csv"
    tmp = manifest.with_name(f".{manifest.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption", "colour", "shape", "direction"])
        writer.writerows(rows)
    os.replace(tmp, manifest)
    return manifest
