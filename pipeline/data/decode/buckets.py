"""Buckets: the (frames, height, width) shapes clips are cut to, and which video goes where.

A video goes to the bucket of nearest aspect ratio among those whose clip length it can fill at
the target fps. Resolution never disqualifies a bucket (small videos are upscaled), it only
breaks ties. Timing convention, shared with decode.py: a clip of T frames at `fps` that starts at
s samples the times s + k / fps for k < T; it fits in a window [a, b) when s >= a and its last
sample time lies before b by at least TIME_TOLERANCE (a frame is shown until the next one starts,
so a 48-frame 24 fps video lasts 2.0 s and cannot hold a sample at t = 2.0 s).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

TIME_TOLERANCE = 1e-3
"""Seconds. Container timestamps are rounded (Matroska and WebM store milliseconds), so times
closer than this count as equal."""

_BUCKET_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True, kw_only=True, order=True)
class Bucket:
    """One clip shape. Written "FRAMESxHEIGHTxWIDTH", e.g. "17x256x448"."""

    frames: int
    """Frames per clip (at the target fps)."""
    height: int
    """Clip height in pixels."""
    width: int
    """Clip width in pixels."""

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Bucket.{name}={value!r}: must be a positive integer")

    @classmethod
    def parse(cls, text: str) -> Bucket:
        match = _BUCKET_RE.match(text)
        if not match:
            raise ValueError(f"bucket {text!r}: expected FRAMESxHEIGHTxWIDTH, e.g. '17x256x448'")
        frames, height, width = (int(g) for g in match.groups())
        return cls(frames=frames, height=height, width=width)

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    def span(self, fps: float) -> float:
        """Seconds from the first sample time to the last one."""
        return (self.frames - 1) / fps

    def period(self, fps: float) -> float:
        """Seconds a clip occupies: its T frames, each shown for 1 / fps."""
        return self.frames / fps

    def fits(self, window: float, fps: float) -> bool:
        """Whether one clip fits in `window` seconds of video (see the module docstring)."""
        return self.span(fps) <= window - TIME_TOLERANCE

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, kw_only=True)
class Assignment:
    """Where one video goes: a bucket and clip start times, or the reason it has none."""

    bucket: Bucket | None
    """The chosen bucket; None when the video is skipped."""
    starts: tuple[float, ...] = ()
    """Clip start times in seconds from the video's first frame, increasing, non-overlapping."""
    reason: str | None = None
    """Why the video is skipped ("too_short"); None when it has a bucket."""

    def __post_init__(self) -> None:
        if (self.bucket is None) == (self.reason is None):
            raise ValueError(f"Assignment: give a bucket or a reason, not both or neither "
                             f"(bucket={self.bucket}, reason={self.reason!r})")
        if self.bucket is not None and not self.starts:
            raise ValueError(f"Assignment: bucket {self.bucket} with no clip start times")


@dataclass(frozen=True, kw_only=True)
class BucketTable:
    """The configured buckets, in the order given (the order only breaks exact ties)."""

    buckets: tuple[Bucket, ...]
    """At least one bucket, no duplicates."""

    def __post_init__(self) -> None:
        buckets = tuple(self.buckets)
        object.__setattr__(self, "buckets", buckets)
        if not buckets:
            raise ValueError("BucketTable.buckets is empty: give at least one, e.g. '17x256x256'")
        for b in buckets:
            if not isinstance(b, Bucket):
                raise ValueError(f"BucketTable.buckets holds {b!r}: expected Bucket (use parse_buckets)")
        names = [b.name for b in buckets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"BucketTable.buckets repeats {', '.join(dupes)}: list each bucket once")

    @classmethod
    def parse(cls, spec: str) -> BucketTable:
        parts = [p for p in spec.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"bucket table {spec!r} is empty: expected e.g. '17x256x256,17x256x448'")
        return cls(buckets=tuple(Bucket.parse(p) for p in parts))

    def __str__(self) -> str:
        return ",".join(b.name for b in self.buckets)

    def __iter__(self):
        return iter(self.buckets)

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, name: str) -> Bucket:
        for b in self.buckets:
            if b.name == name:
                return b
        raise KeyError(f"no bucket {name!r} in table {self}")

    def to_list(self) -> list[dict[str, int]]:
        """JSON-friendly form (for manifest.json)."""
        return [{"frames": b.frames, "height": b.height, "width": b.width} for b in self.buckets]

    @classmethod
    def from_list(cls, items: list[dict[str, int]]) -> BucketTable:
        return cls(buckets=tuple(Bucket(**item) for item in items))

    def assign(self, **kwargs) -> Assignment:
        """assign_bucket(self, **kwargs)."""
        return assign_bucket(self, **kwargs)


def parse_buckets(spec: str) -> BucketTable:
    """"17x256x256,17x256x448" -> BucketTable."""
    return BucketTable.parse(spec)


def clip_starts(*, window_start: float, window_end: float, bucket: Bucket, fps: float,
                max_clips: int = 1) -> tuple[float, ...]:
    """Start times of up to max_clips non-overlapping clips in [window_start, window_end).

    The window is cut into n equal segments (n as large as max_clips and the clip period allow)
    and a clip starts at the beginning of each, so clips spread over the whole video and the
    result depends only on the numbers given. One clip starts at window_start. Returns () when
    not even one clip fits.
    """
    if max_clips < 1:
        raise ValueError(f"max_clips={max_clips}: must be >= 1")
    window = window_end - window_start
    if not bucket.fits(window, fps):
        return ()
    # A segment must hold a whole clip period so the next clip cannot overlap; the last segment
    # then also holds the last clip's final sample (period > span).
    n = max(1, min(max_clips, math.floor((window + TIME_TOLERANCE) / bucket.period(fps))))
    step = window / n
    return tuple(window_start + i * step for i in range(n))


def _aspect_distance(a: float, b: float) -> float:
    # Log ratio: 2:1 and 1:2 are equally far from 1:1.
    return abs(math.log(a) - math.log(b))


def assign_bucket(table: BucketTable, *, width: int, height: int, duration: float, fps: float,
                  start: float | None = None, end: float | None = None,
                  clips_per_video: int = 1) -> Assignment:
    """Picks the bucket for a video of width x height pixels lasting `duration` seconds.

    Only the window [start, end) of the video is used (None: the whole video; an end past the
    video is cut to the video). Among the buckets one clip at `fps` fits in, the nearest aspect
    ratio wins; ties go to a bucket that needs no upscaling, then to more frames, then to more
    pixels, then to table order. Then up to clips_per_video clip starts are planned.
    """
    if width < 1 or height < 1:
        raise ValueError(f"video size {width}x{height}: width and height must be positive")
    if fps <= 0 or not math.isfinite(fps):
        raise ValueError(f"fps={fps}: must be a positive number")
    if clips_per_video < 1:
        raise ValueError(f"clips_per_video={clips_per_video}: must be >= 1")
    window_start = 0.0 if start is None else float(start)
    window_end = float(duration) if end is None else min(float(end), float(duration))
    window = window_end - window_start
    candidates = [b for b in table if b.fits(window, fps)]
    if not candidates:
        return Assignment(bucket=None, reason="too_short")
    aspect = width / height

    def key(item: tuple[int, Bucket]):
        order, b = item
        # Round so float noise cannot beat a real tie-breaker.
        distance = round(_aspect_distance(aspect, b.aspect), 9)
        upscale = max(b.height / height, b.width / width) > 1.0
        return (distance, upscale, -b.frames, -(b.height * b.width), order)

    _, bucket = min(enumerate(candidates), key=key)
    starts = clip_starts(window_start=window_start, window_end=window_end, bucket=bucket, fps=fps,
                         max_clips=clips_per_video)
    return Assignment(bucket=bucket, starts=starts)
