"""Opening video files: the checks that classify bad input, the header, VideoFile and probe().

Every failure on bad input is a DecodeError whose `reason` is one of REASONS.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import numpy as np

from pipeline.data.decode.buckets import TIME_TOLERANCE
from pipeline.data.decode.sniff import classify_unreadable

REASONS = frozenset({"missing", "unreadable", "not_a_video", "corrupt", "truncated", "too_short", "timeout"})


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
    """Frame width in pixels as shown (rotation applied: a phone's 1920x1080 stored frame turned
    90 degrees is 1080 wide)."""
    height: int
    """Frame height in pixels as shown."""
    fps: float
    """Average frame rate: num_frames / duration (exact for constant-rate files)."""
    num_frames: int
    """Frames present in the file."""
    duration: float
    """Seconds from the first frame's start to the last frame's end."""
    backend: str
    """The library whose pass over the packets gave this information ("pyav" or "decord")."""
    claimed_duration: float | None = None
    """Seconds the container header claims; None when it does not say."""
    rotation: int = 0
    """Degrees (0, 90, 180, 270) the stored frames are turned counter-clockwise to be shown (the
    display matrix / rotate tag); the decoders turn them upright."""

    @property
    def truncated(self) -> bool:
        """Whether less is present than the header claims (a file cut off)."""
        if self.claimed_duration is None:
            return False
        return self.claimed_duration > self.duration + max(TIME_TOLERANCE, 1.5 / self.fps)


def check_path(path: str) -> None:
    """Raises DecodeError for paths that cannot be a readable video file."""
    if not os.path.exists(path):
        raise DecodeError("missing", f"{path}: no such file")
    mode = os.stat(path).st_mode
    # A named pipe is a stream a decoder can read; one whose writer hangs is what the decode timeout
    # (stages.decode_units) is for.
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise DecodeError("not_a_video", f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise DecodeError("unreadable", f"{path}: no permission to read")
    if stat.S_ISREG(mode) and os.path.getsize(path) == 0:
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


def frame_period(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return 1.0 / float(rate) if rate else 1.0 / 30


def _first_frame_rotation(packet, keep_trying: bool) -> int | None:
    """The display rotation of the first frame `packet` decodes to (0, 90, 180, 270); None when it gives
    no frame yet and `keep_trying`, 0 after that or when the decoder fails (the demuxing goes on)."""
    try:
        for frame in packet.decode():
            return round(frame.rotation / 90) * 90 % 360
    except Exception:  # noqa: BLE001 - a damaged first packet: no rotation, probe() judges the file
        return 0
    return None if keep_trying else 0


class VideoFile:
    """One video opened once: probed, then decoded from the same handle.

    Probing walks every packet (demuxing, no decoding), so it reads the whole file; the walk also
    keeps the keyframe times, which PyAV's multi-clip decode needs. Decoding then seeks this handle
    back to the start instead of opening the file again. Use as a context manager, or close().

    walk=False opens the header only: video.open_video then reads the first frame's rotation and lets
    decord's own index (its one pass over the packets) stand in for the walk (`decord_index`, `info`).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 1, walk: bool = True):
        self.path, self.threads = os.fspath(path), threads
        self.walked = False  # True once packets were read: decoding must seek back first
        self.info: VideoInfo | None = None
        self.keyframe_pts: list[int] | None = None
        self.decord_index = None  # readers.DecordIndex when decord indexed the file instead of the walk
        self._open()
        if walk:
            self.walk()

    def _open(self) -> None:
        self.container, self.stream = open_container(self.path)
        # Before the first decode: a codec's thread count is fixed once it is open.
        self.stream.codec_context.thread_count = self.threads
        if self.threads > 1:
            self.stream.codec_context.thread_type = "AUTO"

    def walk(self) -> None:
        """Probe from the packets (sets `info` and `keyframe_pts`)."""
        if self.walked:  # packets were read already (the first frame's rotation): start on a fresh handle
            self.container.close()
            self._open()
        try:
            self.info, self.keyframe_pts = self._walk()
        except BaseException:
            self.close()
            raise

    def first_frame_rotation(self) -> int:
        """The display rotation (0, 90, 180, 270), reading packets only until the first frame decodes."""
        self.walked = True
        try:
            for count, packet in enumerate(self.container.demux(self.stream)):
                rotation = _first_frame_rotation(packet, keep_trying=count < 32)
                if rotation is not None:
                    return rotation
        except Exception:  # noqa: BLE001 - damaged data: the decoder that reads the file judges it
            pass
        return 0

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.decord_index = None  # drops decord's reader (it has no close)
        self.container.close()

    def _walk(self) -> tuple[VideoInfo, list[int]]:
        """Reads the header and walks the packets: size, frames, duration, rotation, keyframes."""
        path, container, stream = self.path, self.container, self.stream
        self.walked = True
        try:
            tb = float(stream.time_base)
            pts, keyframes, last_pts, last_duration, rotation = [], [], None, 0, None
            try:
                for packet in container.demux(stream):
                    if rotation is None:  # decode until the first frame: it carries the display matrix
                        rotation = _first_frame_rotation(packet, keep_trying=len(pts) < 32)
                    if packet.is_keyframe and packet.pts is not None:
                        keyframes.append(packet.pts)
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
            end = (max(pts) - origin) * tb + (last_duration * tb or frame_period(stream))
            rotation = rotation or 0
            width, height = stream.codec_context.width, stream.codec_context.height
            if rotation in (90, 270):
                width, height = height, width
            info = VideoInfo(width=width, height=height, fps=len(pts) / end, num_frames=len(pts), duration=end,
                             backend="pyav", claimed_duration=claimed_duration(container, stream), rotation=rotation)
            return info, keyframes
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError("corrupt", f"{path}: cannot read the video stream ({e})") from None


def probe(path: str | os.PathLike) -> VideoInfo:
    """Reads the header and walks the packets (no decoding): size, frames, duration. To decode the
    same file afterwards, open a VideoFile and hand it to decode_clips: the file is read once less."""
    with VideoFile(path) as video:
        return video.info


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def damaged_error(path: str, what: str, error: BaseException) -> DecodeError:
    """"truncated" when the file holds less than its header claims (walks its packets: only on
    this failure path), else "corrupt"."""
    try:
        info = probe(path)
        if info.truncated:
            return DecodeError("truncated", f"{path}: the file is cut off ({info.duration:.3f} s of the "
                                            f"{info.claimed_duration:.3f} s its header claims); {what} "
                                            f"({first_line(error)})")
    except DecodeError as e:
        if e.reason == "truncated":
            return e
    return DecodeError("corrupt", f"{path}: {what} ({first_line(error)})")


def shortfall_error(path: str, container, stream, have_end: float, targets: np.ndarray) -> DecodeError:
    """The error for a stream that ends (after have_end seconds) before the clip's last time."""
    claimed = claimed_duration(container, stream)
    need = f"the clip needs a frame at t = {targets[-1]:.3f} s (start {targets[0]:.3f} s)"
    if claimed is not None and claimed > have_end + max(TIME_TOLERANCE, 1.5 * frame_period(stream)):
        return DecodeError("truncated", f"{path}: only {have_end:.3f} s of the {claimed:.3f} s the "
                                        f"header claims can be decoded; {need}")
    return DecodeError("too_short", f"{path}: the video lasts {have_end:.3f} s; {need}")
