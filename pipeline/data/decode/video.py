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

Every failure on bad input is a DecodeError whose `reason` is one of REASONS (container.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from pipeline.data.decode import readers
from pipeline.data.decode.buckets import TIME_TOLERANCE, Bucket, BucketTable, assign_bucket
from pipeline.data.decode.container import DecodeError, VideoFile, VideoInfo, claimed_duration, open_container
from pipeline.data.decode.frames import target_times, to_channels_first, to_model_range
from pipeline.data.source.manifest import VideoRecord

BACKENDS = ("auto", "decord", "pyav")


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


def open_video(path: str | os.PathLike, *, backend: str = "auto", threads: int = 1) -> VideoFile:
    """The video opened and probed by the pass over its packets that the decoding needs anyway, for
    decode_clips(video=...): the file is read once.

    PyAV (backend "pyav", rotated videos, no decord installed) walks the packets of its handle.
    decord indexes every packet when it opens a reader, so for decord the header and the first
    frame's rotation come from PyAV and the frame count and times from that reader; the walk is
    skipped. If decord cannot index the file ("auto"), PyAV walks it instead.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "pyav" or not readers.HAVE_DECORD:
        return VideoFile(path, threads=threads)  # decode_clips explains backend="decord" without decord
    video = VideoFile(path, threads=threads, walk=False)
    try:
        if video.first_frame_rotation() % 360 == 0:  # rotated videos are PyAV's (decode_clips)
            try:
                index = readers.index_decord(video.path, threads)
            except DecodeError:
                if backend == "decord":
                    raise
                index = None
            if index is not None and index.end > 0:  # 0: one frame left of a cut file; PyAV's walk tells
                context = video.stream.codec_context
                video.decord_index = index
                video.info = VideoInfo(width=context.width, height=context.height, fps=len(index.starts) / index.end,
                                       num_frames=len(index.starts), duration=index.end, backend="decord",
                                       claimed_duration=claimed_duration(video.container, video.stream))
                return video
        video.walk()
        return video
    except BaseException:
        video.close()
        raise


def decode_clips(path: str | os.PathLike, *, starts: list[float], frames: int, height: int, width: int,
                 fps: float, backend: str = "auto", threads: int = 1, uint8: bool = False,
                 rotation: int = 0, video: VideoFile | None = None) -> list[np.ndarray]:
    """Several clips of one video in one pass, each float32 (3, frames, height, width) in
    [-1, 1] (with `uint8`: the uint8 pixels (3, frames, height, width) that give those numbers
    through frames.uint8_to_model_range), in the order of `starts` (see the module docstring).

    backend: "decord", "pyav", or "auto" (decord, then PyAV if decord fails for any reason
    but a clean too_short). threads: decoder threads (1 = one core per decode task). rotation: the
    video's display rotation (probe's VideoInfo.rotation): frames come out upright. video: the
    file already opened and probed (VideoFile, left open for the caller to close): PyAV decodes
    from that handle and uses its keyframes, so the file is not opened and walked again; without
    it the file is opened here (header only: no probe walk) and closed. decord reads with the reader
    open_video indexed, or opens its own (it cannot read from a PyAV handle).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    for name, value in (("frames", frames), ("height", height), ("width", width), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps={fps}: must be a positive number")
    if not starts or not all(s >= 0 and math.isfinite(s) for s in starts):
        raise ValueError(f"starts={starts}: give at least one start time, each a number >= 0")
    if backend == "decord" and not readers.HAVE_DECORD:
        raise ValueError("backend='decord' but decord is not installed; use 'pyav' or 'auto'")
    path = os.fspath(path)
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    clips = [target_times(starts[i], frames, fps) for i in order]
    # decord turns rotated videos itself, and then fails its size check or squeezes the frames into the
    # stored size (seen with decord 0.6): rotated videos go to PyAV, which we turn upright ourselves.
    if rotation % 360 and backend == "decord":
        raise ValueError(f"{path}: backend='decord' cannot read rotated videos correctly; use 'pyav' or 'auto'")
    use_decord = backend == "decord" or (backend == "auto" and readers.HAVE_DECORD and not rotation % 360)
    own = video is None
    if own:  # classifies missing / not-a-video files
        container, stream = open_container(path)
        keyframe_pts, walked = None, False
    else:
        container, stream, keyframe_pts, walked = video.container, video.stream, video.keyframe_pts, video.walked
    try:
        decoded = None
        if use_decord:
            try:
                index = video.decord_index if video is not None else None
                decoded = readers.decode_decord(path, container, stream, clips, height, width, threads, rotation,
                                                index=index)
            except DecodeError as e:
                # A clean too_short is final; anything else gets a second chance with PyAV.
                if backend == "decord" or e.reason == "too_short":
                    raise
        if decoded is None:  # the same PyAV handle: decord only read the header's durations from it
            decoded = readers.decode_pyav(path, container, stream, clips, height, width, threads, rotation,
                                          keyframe_pts=keyframe_pts, rewind=walked)
    finally:
        if own:
            container.close()
    out: list[np.ndarray] = [np.empty(0)] * len(starts)
    for i, clip in zip(order, decoded):
        out[i] = to_channels_first(clip) if uint8 else to_model_range(clip)
    return out


def decode_clip(path: str | os.PathLike, *, frames: int, height: int, width: int, fps: float,
                start: float = 0.0, backend: str = "auto", threads: int = 1, rotation: int = 0) -> np.ndarray:
    """One clip: float32 (3, frames, height, width) in [-1, 1]; see decode_clips."""
    if not (start >= 0 and math.isfinite(start)):
        raise ValueError(f"start={start}: must be a number >= 0")
    return decode_clips(path, starts=[start], frames=frames, height=height, width=width, fps=fps,
                        backend=backend, threads=threads, rotation=rotation)[0]
