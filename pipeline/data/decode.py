"""Probe and decode video clips: decord first, PyAV for files decord cannot read.

Frame choice (both backends, also for variable-frame-rate files): a clip of T frames at `fps`
starting at `start` samples the times t_k = start + k / fps. Each t_k takes the LAST source
frame whose presentation time is <= t_k (+ TIME_TOLERANCE, for containers that round times to
the millisecond): the frame a player would be showing at t_k. Times count from the video
stream's first frame (the container's start offset is removed). A frame is shown until the
next one starts; the last frame until the end of the stream, so t_{T-1} must lie before the end
(see buckets.py). Several t_k may take the same frame (target fps above the source's).

Only the chosen frames are converted to RGB: decord reads them with get_batch; PyAV seeks to
the keyframe before `start` and decodes forward. Several clips of one video (decode_clips) share
one pass. Both backends then crop the centred region with the bucket's aspect ratio and scale it
with torch (bilinear, antialiased, on uint8: cheaper than libswscale's scaling, and the same
code for both backends).

Every failure on bad input is a DecodeError whose `reason` is one of REASONS.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.buckets import TIME_TOLERANCE, Bucket, BucketTable, assign_bucket
from pipeline.data.manifest import VideoRecord
from pipeline.data.sniff import classify_unreadable

BACKENDS = ("auto", "decord", "pyav")
REASONS = frozenset({"missing", "unreadable", "not_a_video", "corrupt", "truncated", "too_short"})


class DecodeError(Exception):
    """A video that cannot give the clip asked for. `reason` is machine-readable (REASONS)."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"DecodeError reason {reason!r}: expected one of {sorted(REASONS)}")
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message

    def __reduce__(self):  # picklable with its two arguments (Ray ships exceptions)
        return (DecodeError, (self.reason, self.message))


@dataclass(frozen=True, kw_only=True)
class VideoInfo:
    """What probe() found: the video stream as it can really be read."""

    width: int
    """Frame width in pixels (stored size; rotation metadata is not applied)."""
    height: int
    """Frame height in pixels."""
    fps: float
    """Average frame rate: num_frames / duration (exact for constant-rate files)."""
    num_frames: int
    """Frames present in the file."""
    duration: float
    """Seconds from the first frame's start to the last frame's end."""
    backend: str
    """The library that read this information ("pyav")."""
    claimed_duration: float | None = None
    """Seconds the container header claims; None when it does not say."""

    @property
    def truncated(self) -> bool:
        """Whether less is present than the header claims (a file cut off)."""
        if self.claimed_duration is None:
            return False
        return self.claimed_duration > self.duration + max(TIME_TOLERANCE, 1.5 / self.fps)


@dataclass(frozen=True, kw_only=True)
class ClipPlan:
    """One clip to cut from a video."""

    index: int
    """0, 1, ... in order of start time within the video."""
    start: float
    """Seconds from the video's first frame."""
    bucket: Bucket
    """Frames and size of the clip."""
    fps: float
    """Sampling rate of the clip's frames."""

    @property
    def end(self) -> float:
        """Where the clip's time ends (exclusive): start + frames / fps."""
        return self.start + self.bucket.period(self.fps)


def target_times(start: float, frames: int, fps: float) -> np.ndarray:
    """t_k = start + k / fps, k < frames."""
    return start + np.arange(frames, dtype=np.float64) / fps


def select_frames(timestamps: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target time, the index of the last frame whose time is <= it (tolerance
    included); times before the first frame take frame 0. timestamps: increasing seconds."""
    idx = np.searchsorted(np.asarray(timestamps), np.asarray(targets) + TIME_TOLERANCE, side="right") - 1
    return np.maximum(idx, 0)


def crop_box(src_height: int, src_width: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width): the centred region of the source with the bucket's
    aspect ratio. Scaling it to height x width is "resize the shorter side (relative to the
    bucket) onto the bucket, then center-crop", without scaling pixels that are cropped away."""
    scale = max(height / src_height, width / src_width)
    ch, cw = min(src_height, round(height / scale)), min(src_width, round(width / scale))
    return (src_height - ch) // 2, (src_width - cw) // 2, ch, cw


def resize_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(T, h, w, 3) uint8 RGB -> (T, 3, height, width) uint8: crop_box, then bilinear scaling
    with antialiasing (torch's uint8 kernel: about 4x faster than libswscale's bicubic)."""
    top, left, ch, cw = crop_box(frames.shape[1], frames.shape[2], height, width)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, h, w) channels-last
    x = x[:, :, top:top + ch, left:left + cw]
    if (ch, cw) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x


def to_model_range(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) uint8 -> (3, T, H, W) float32 in [-1, 1]."""
    t, c, h, w = frames.shape
    out = torch.empty((c, t, h, w), dtype=torch.float32)  # (3, T, H, W)
    out.copy_(frames.permute(1, 0, 2, 3))
    return out.mul_(1 / 127.5).sub_(1.0).numpy()


# ---------------------------------------------------------------------------------------------
# Opening and classifying files


def check_path(path: str) -> None:
    """Raises DecodeError for paths that cannot be a readable video file."""
    if not os.path.exists(path):
        raise DecodeError("missing", f"{path}: no such file")
    if not os.path.isfile(path):
        raise DecodeError("not_a_video", f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise DecodeError("unreadable", f"{path}: no permission to read")
    if os.path.getsize(path) == 0:
        raise DecodeError("not_a_video", f"{path}: empty file")


def open_container(path: str):
    """(container, video stream) with PyAV, or a DecodeError saying why not."""
    import av

    check_path(path)
    try:
        container = av.open(path, metadata_errors="ignore")
    except Exception as e:  # av.error.* and OSError: classify by the bytes, not the message
        reason = classify_unreadable(path)
        what = {"truncated": "the file is cut off", "corrupt": "a damaged video file",
                "not_a_video": "not a video file"}[reason]
        raise DecodeError(reason, f"{path}: {what} ({e})") from None
    if not container.streams.video:
        streams = len(container.streams)
        container.close()
        reason = classify_unreadable(path) if streams == 0 else "not_a_video"
        if reason != "not_a_video":  # a container whose index is damaged or cut off
            raise DecodeError(reason, f"{path}: a video container with no readable streams")
        raise DecodeError("not_a_video", f"{path}: no video stream ({streams} other streams)")
    stream = container.streams.video[0]
    if not stream.codec_context.width or not stream.codec_context.height:
        container.close()
        raise DecodeError("corrupt", f"{path}: the video stream has no frame size")
    return container, stream


def claimed_duration(container, stream) -> float | None:
    """Seconds the header claims for the video stream (None if it says nothing)."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _frame_period(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return 1.0 / float(rate) if rate else 1.0 / 30


def probe(path: str | os.PathLike) -> VideoInfo:
    """Reads the header and walks the packets (no decoding): size, frames, duration."""
    path = os.fspath(path)
    container, stream = open_container(path)
    try:
        tb = float(stream.time_base)
        pts, last_pts, last_duration = [], None, 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                p = packet.pts if packet.pts is not None else packet.dts
                if p is not None:
                    pts.append(p)
                    if last_pts is None or p >= last_pts:  # packets come in decode order
                        last_pts, last_duration = p, packet.duration or 0
        except Exception:  # a damaged tail: keep the packets read so far, `truncated` tells
            pass
        origin = stream.start_time if stream.start_time is not None else min(pts, default=0)
        pts = [p for p in pts if p >= origin]  # pre-roll packets an edit list discards
        if not pts:
            if classify_unreadable(path) == "truncated":
                raise DecodeError("truncated", f"{path}: the file is cut off before its first frame")
            raise DecodeError("corrupt", f"{path}: the video stream holds no frames")
        end = (max(pts) - origin) * tb + (last_duration * tb or _frame_period(stream))
        return VideoInfo(width=stream.codec_context.width, height=stream.codec_context.height,
                         fps=len(pts) / end, num_frames=len(pts), duration=end, backend="pyav",
                         claimed_duration=claimed_duration(container, stream))
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError("corrupt", f"{path}: cannot read the video stream ({e})") from None
    finally:
        container.close()


def plan_clips(record: VideoRecord, info: VideoInfo, table: BucketTable, fps: float,
               clips_per_video: int = 1) -> list[ClipPlan]:
    """The clips to cut from one probed video, or DecodeError("too_short" | "truncated")."""
    assignment = assign_bucket(table, width=info.width, height=info.height, duration=info.duration,
                               fps=fps, start=record.start, end=record.end,
                               clips_per_video=clips_per_video)
    if assignment.bucket is None:
        shortest = min(table, key=lambda b: b.frames)
        need = shortest.span(fps) + TIME_TOLERANCE
        window = f" in [{record.start or 0:g}, {record.end if record.end is not None else 'end'}]"
        if info.truncated:
            raise DecodeError("truncated", f"{record.path}: only {info.duration:.3f} s of the "
                                           f"{info.claimed_duration:.3f} s the header claims are present; "
                                           f"the shortest bucket needs {need:.3f} s{window}")
        raise DecodeError("too_short", f"{record.path}: {info.duration:.3f} s long; the shortest bucket "
                                       f"({shortest}) needs more than {need:.3f} s at {fps:g} fps{window}")
    return [ClipPlan(index=i, start=s, bucket=assignment.bucket, fps=fps)
            for i, s in enumerate(assignment.starts)]


def decode_clips(path: str | os.PathLike, *, starts: list[float], frames: int, height: int, width: int,
                 fps: float, backend: str = "auto", threads: int = 1) -> list[np.ndarray]:
    """Several clips of one video in one pass, each float32 (3, frames, height, width) in
    [-1, 1], in the order of `starts` (see the module docstring for the frame choice).

    backend: "decord", "pyav", or "auto" (decord, then PyAV if decord fails for any reason
    but a clean too_short). threads: decoder threads (1 = one core per decode task).
    """
    from pipeline.data import decode_backends as backends

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    for name, value in (("frames", frames), ("height", height), ("width", width), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps={fps}: must be a positive number")
    if not starts or not all(s >= 0 and math.isfinite(s) for s in starts):
        raise ValueError(f"starts={starts}: give at least one start time, each a number >= 0")
    if backend == "decord" and not backends.HAVE_DECORD:
        raise ValueError("backend='decord' but decord is not installed; use 'pyav' or 'auto'")
    path = os.fspath(path)
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    clips = [target_times(starts[i], frames, fps) for i in order]
    use_decord = backend == "decord" or (backend == "auto" and backends.HAVE_DECORD)
    for library in (["decord"] if use_decord else []) + ([] if backend == "decord" else ["pyav"]):
        container, stream = open_container(path)  # classifies missing / not-a-video files
        try:
            if library == "pyav":
                decoded = backends.decode_pyav(path, container, stream, clips, height, width, threads)
            else:
                try:
                    decoded = backends.decode_decord(path, container, stream, clips, height, width, threads)
                except DecodeError as e:
                    # A clean too_short is final; anything else gets a second chance with PyAV.
                    if backend == "decord" or e.reason == "too_short":
                        raise
                    continue
        finally:
            container.close()
        out: list[np.ndarray] = [np.empty(0)] * len(starts)
        for i, clip in zip(order, decoded):
            out[i] = to_model_range(clip)
        return out
    raise AssertionError("unreachable")  # the pyav pass returns or raises


def decode_clip(path: str | os.PathLike, *, frames: int, height: int, width: int, fps: float,
                start: float = 0.0, backend: str = "auto", threads: int = 1) -> np.ndarray:
    """One clip: float32 (3, frames, height, width) in [-1, 1]; see decode_clips."""
    if not (start >= 0 and math.isfinite(start)):
        raise ValueError(f"start={start}: must be a number >= 0")
    return decode_clips(path, starts=[start], frames=frames, height=height, width=width, fps=fps,
                        backend=backend, threads=threads)[0]
