"""The two decoders behind decode.decode_clips (frame choice and conventions: see decode.py).

Both receive an open PyAV container (decode_clips opened it to classify bad files and read the
frame size) and the target times of each clip (each increasing, clips sorted by start), and
return one uint8 (T, 3, H, W) tensor per clip, or raise DecodeError. Several clips of one video
share one pass over it: decord reads the union of their frames with get_batch; PyAV decodes
forward and seeks only when a clip starts after a keyframe it has not reached yet.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.decode.buckets import TIME_TOLERANCE
from pipeline.data.decode.container import (
    DecodeError,
    damaged_error,
    first_line,
    frame_period,
    shortfall_error,
)
from pipeline.data.decode.frames import resize_crop, select_frames

try:
    import decord

    HAVE_DECORD = True
except ImportError:  # decord has no wheels for some platforms (e.g. aarch64): PyAV does all
    decord = None
    HAVE_DECORD = False

_DECORD_CHUNK = 8  # full-size frames held at once (a 4K RGB frame is 25 MB)


# ---------------------------------------------------------------------------------------------
# decord


class _SizeQuirk(Exception):
    """decord 0.6 cannot hand out frames of a few widths (8, 12, 16, 24, 48, 72 seen): its copy
    check fails on their padded rows."""


@dataclass(frozen=True)
class DecordIndex:
    """A decord reader and the frame times its index gave (one pass over the file's packets)."""

    reader: object
    """decord.VideoReader at the size it was opened with."""
    starts: np.ndarray
    """Start time of each frame in seconds, from the first frame's."""
    end: float
    """When the last frame ends, in the same seconds."""


def index_decord(path: str, threads: int, size: tuple[int, int] = (-1, -1)) -> DecordIndex:
    """Open a decord reader (it indexes every packet) and read its frame times, or DecodeError.
    size: (width, height) decord scales to; (-1, -1) keeps the native size."""
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), width=size[0], height=size[1], num_threads=threads)
    except Exception as e:
        raise damaged_error(path, "decord cannot open it", e) from None
    try:
        n = len(reader)
        if n == 0:
            raise DecodeError("corrupt", f"{path}: decord finds no frames")
        times = reader.get_frame_timestamp(np.arange(n))  # (n, 2): start, end seconds of each frame
    except DecodeError:
        raise
    except Exception as e:  # decord raises its own DECORDError / RuntimeError on bad data
        raise DecodeError("corrupt", f"{path}: decord cannot read its frame times ({first_line(e)})") from None
    starts = times[:, 0] - times[0, 0]
    if np.any(np.diff(starts) < 0):
        raise DecodeError("corrupt", f"{path}: decord's frame times are out of order")
    return DecordIndex(reader=reader, starts=starts, end=float(times[-1, 1] - times[0, 0]))


def decode_decord(path: str, container, stream, clips: list[np.ndarray], height: int, width: int,
                  threads: int, rotation: int = 0, index: DecordIndex | None = None) -> list[torch.Tensor]:
    """Timestamps from decord's index, then get_batch on the union of the chosen frames. index: the
    file already indexed at its native size (video.open_video); else a reader is opened here."""
    src_h, src_w = stream.codec_context.height, stream.codec_context.width
    size = (-1, -1)  # native size: torch resizes (faster than libswscale's bicubic, same for PyAV)
    for _ in range(3):
        try:
            return _read_decord(path, container, stream, clips, height, width, rotation,
                                index or index_decord(path, threads, size))
        except _SizeQuirk:  # decode one pixel wider instead (only tiny videos hit this)
            index = None
            w = (src_w if size[0] < 0 else size[0]) + 1
            size = (w, round(w * src_h / src_w))
    raise DecodeError("corrupt", f"{path}: decord cannot return frames of this size; use backend='pyav'")


def _read_decord(path, container, stream, clips, height, width, rotation, index: DecordIndex) -> list[torch.Tensor]:
    last = max(clips, key=lambda t: t[-1])
    if last[-1] > index.end - TIME_TOLERANCE:
        raise shortfall_error(path, container, stream, index.end, last)
    chosen = select_frames(index.starts, np.concatenate(clips))
    unique, inverse = np.unique(chosen, return_inverse=True)
    chunks = []
    try:
        for i in range(0, len(unique), _DECORD_CHUNK):
            batch = index.reader.get_batch(unique[i:i + _DECORD_CHUNK].tolist()).asnumpy()  # (u, h, w, 3)
            chunks.append(resize_crop(batch, height, width, rotation))  # (u, 3, H, W) uint8, upright
    except Exception as e:  # decord raises its own DECORDError / RuntimeError on bad data
        if "DECORDArrayCopyFromTo" in str(e):
            raise _SizeQuirk from None
        raise DecodeError("corrupt", f"{path}: decord failed reading frames ({first_line(e)})") from None
    frames = torch.cat(chunks)[torch.from_numpy(inverse.reshape(-1))]  # (sum T, 3, H, W)
    return list(frames.split([len(t) for t in clips]))


# ---------------------------------------------------------------------------------------------
# PyAV


class _Overshot(Exception):
    """A seek landed after the first target time (an inexact index)."""


class _Reader:
    """Frames of one stream in time order, with the state that carries from clip to clip."""

    def __init__(self, path: str, container, stream, height: int, width: int, rotation: int = 0,
                 keyframe_pts: list[int] | None = None):
        self.path, self.container, self.stream, self.height, self.width = path, container, stream, height, width
        self.rotation = rotation
        self.tb, self.origin, self.period = float(stream.time_base), stream.start_time or 0, frame_period(stream)
        # Seconds; from the probe's walk when it gave them, else read when a second clip needs them.
        self.keyframes: np.ndarray | None = None if keyframe_pts is None else self._seconds(keyframe_pts)
        self.started = False
        self.broken: Exception | None = None  # the error that ended the stream early, if any
        self._reset(self._frames())

    def _reset(self, frames) -> None:
        self.frames, self.pending, self.just_seeked = frames, None, False
        self.held = self.held_pixels = None  # the last frame at or before the next target
        self.held_time, self.held_duration = -np.inf, self.period

    def _frames(self):
        packets = self.container.demux(self.stream)
        while True:
            try:
                packet = next(packets, None)
                decoded = packet.decode() if packet is not None else []
            except Exception as e:  # damaged or cut-off data: keep what came before it
                self.broken = e
                try:  # drain the frames the decoder holds (B-frame reordering delays them)
                    decoded, packet = self.stream.codec_context.decode(None), None
                except Exception:
                    decoded, packet = [], None
            for frame in decoded:
                time = (frame.pts - self.origin) * self.tb if frame.pts is not None \
                    else self.held_time + self.held_duration
                if time >= -TIME_TOLERANCE:  # earlier: pre-roll an edit list hides
                    yield time, frame
            if packet is None:
                return

    def seek(self, time: float) -> None:
        self.container.seek(self.origin + int(max(time, 0.0) / self.tb), stream=self.stream, backward=True,
                            any_frame=False)
        self._reset(self._frames())
        self.just_seeked, self.broken = time > 0, None  # a fresh pass: earlier damage may lie behind

    def position(self) -> float:
        """Time of the newest frame pulled from the decoder."""
        return self.pending[0] if self.pending is not None else self.held_time

    def should_seek(self, start: float) -> bool:
        if start < self.held_time - TIME_TOLERANCE:
            return True  # behind us (overlapping clips)
        if not self.started:
            return start > TIME_TOLERANCE
        if self.keyframes is None:
            self.keyframes = self._scan_keyframes()
        before = self.keyframes[self.keyframes <= start + TIME_TOLERANCE]
        # Seek only if a keyframe lies between here and the start: it skips decoding the gap.
        return len(before) > 0 and before[-1] > self.position() + TIME_TOLERANCE

    def _scan_keyframes(self) -> np.ndarray:
        import av

        with av.open(self.path) as container:  # a second handle: demuxing only, no decoding
            stream = container.streams.video[0]
            pts = [p.pts for p in container.demux(stream) if p.is_keyframe and p.pts is not None]
        return self._seconds(pts)

    def _seconds(self, pts: list[int]) -> np.ndarray:
        return np.sort((np.array(pts, dtype=np.float64) - self.origin) * self.tb)

    def _convert(self) -> torch.Tensor:
        if self.held_pixels is None:  # full-size RGB, then torch scales just the crop
            self.held_pixels = resize_crop(self.held.to_ndarray(format="rgb24")[None], self.height, self.width,
                                           self.rotation)[0]
        return self.held_pixels

    def read(self, targets: np.ndarray) -> torch.Tensor:
        """One clip's frames, (T, 3, H, W) uint8, continuing from where the last clip stopped."""
        self.started = True
        picks: list[torch.Tensor] = []
        while len(picks) < len(targets):
            item = self.pending if self.pending is not None else next(self.frames, None)
            self.pending = None
            if item is None:
                break  # end of stream
            time, frame = item
            if self.just_seeked and self.held is None and time > targets[0] + TIME_TOLERANCE:
                raise _Overshot
            self.just_seeked = False
            while len(picks) < len(targets) and time > targets[len(picks)] + TIME_TOLERANCE:
                if self.held is None:  # targets before the first frame take the first frame
                    self.held, self.held_time = frame, time
                picks.append(self._convert())
            if len(picks) == len(targets):
                self.pending = item  # not yet shown: it may start the next clip
                break
            self.held, self.held_pixels, self.held_time = frame, None, time
            self.held_duration = (frame.duration or 0) * self.tb or self.period
        if self.held is None:
            raise self.broken or RuntimeError("no frame could be decoded")  # decode_pyav classifies
        end = self.held_time + self.held_duration  # the last frame is shown until the stream ends
        # ...unless the stream broke off: then a later frame may be missing, so hold nothing.
        while self.broken is None and len(picks) < len(targets) and targets[len(picks)] <= end - TIME_TOLERANCE:
            picks.append(self._convert())
        if len(picks) < len(targets):
            if self.broken is not None:
                raise self.broken  # decode_pyav tells cut off from damaged
            raise shortfall_error(self.path, self.container, self.stream, end, targets)
        return torch.stack(picks)


def decode_pyav(path: str, container, stream, clips: list[np.ndarray], height: int, width: int,
                threads: int, rotation: int = 0, *, keyframe_pts: list[int] | None = None,
                rewind: bool = False) -> list[torch.Tensor]:
    """Seek to the keyframe before a clip's first target time (unless decoding on is cheaper),
    decode forward, convert only the frames chosen. keyframe_pts: the stream's keyframe times (the
    probe's walk), else read when needed; rewind: the handle was walked (probed), seek back first."""
    context = stream.codec_context
    if not context.is_open:  # a probed handle set its threads before its first decode (VideoFile)
        context.thread_count = threads
        if threads > 1:
            context.thread_type = "AUTO"
    try:
        reader = _Reader(path, container, stream, height, width, rotation, keyframe_pts)
        if rewind:
            reader.seek(0.0)  # flushes the decoder the probe used for the first frame's rotation
        out = []
        for targets in clips:
            if reader.should_seek(targets[0]):
                reader.seek(targets[0])
            try:
                out.append(reader.read(targets))
            except _Overshot:  # rare (an inexact index): decode from the first frame instead
                reader.seek(0.0)
                out.append(reader.read(targets))
        return out
    except DecodeError:
        raise
    except Exception as e:  # a demuxer or decoder error: a damaged file or a cut-off one
        raise damaged_error(path, "decoding failed", e) from None
