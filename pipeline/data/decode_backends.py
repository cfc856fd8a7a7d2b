"""The two decoders behind decode.decode_clip (frame choice and conventions: see decode.py).

Both receive an open PyAV container (decode_clip opened it to classify bad files and read the
frame size) and return float32 (3, T, H, W) in [-1, 1], or raise DecodeError.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.buckets import TIME_TOLERANCE
from pipeline.data.decode import (
    DecodeError,
    Geometry,
    _frame_period,
    claimed_duration,
    probe,
    select_frames,
    to_model_range,
)

try:
    import decord

    HAVE_DECORD = True
except ImportError:  # decord has no wheels for some platforms (e.g. aarch64): PyAV does all
    decord = None
    HAVE_DECORD = False


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _damaged(path: str, what: str, error: BaseException) -> DecodeError:
    """"truncated" when the file holds less than its header claims (walks its packets: only on
    this failure path), else "corrupt"."""
    try:
        info = probe(path)
        if info.truncated:
            return DecodeError("truncated", f"{path}: the file is cut off ({info.duration:.3f} s of the "
                                            f"{info.claimed_duration:.3f} s its header claims); {what} "
                                            f"({_first_line(error)})")
    except DecodeError as e:
        if e.reason == "truncated":
            return e
    return DecodeError("corrupt", f"{path}: {what} ({_first_line(error)})")


def _shortfall(path: str, container, stream, have_end: float, targets: np.ndarray) -> DecodeError:
    """The error for a stream that ends (after have_end seconds) before the clip's last time."""
    claimed = claimed_duration(container, stream)
    need = f"the clip needs a frame at t = {targets[-1]:.3f} s (start {targets[0]:.3f} s)"
    if claimed is not None and claimed > have_end + max(TIME_TOLERANCE, 1.5 * _frame_period(stream)):
        return DecodeError("truncated", f"{path}: only {have_end:.3f} s of the {claimed:.3f} s the "
                                        f"header claims can be decoded; {need}")
    return DecodeError("too_short", f"{path}: the video lasts {have_end:.3f} s; {need}")


class _SizeQuirk(Exception):
    """decord cannot hand out frames of a few widths (8, 12, 16, 24, 48, 72 in decord 0.6: its
    copy check fails on their padded rows)."""


def _widen(geometry: Geometry, src_height: int, src_width: int) -> Geometry:
    """The same crop from frames scaled one pixel wider (and proportionally taller)."""
    rw = geometry.resized_width + 1
    rh = max(geometry.resized_height, round(rw * src_height / src_width))
    return Geometry(rh, rw, (rh - geometry.height) // 2, (rw - geometry.width) // 2,
                    geometry.height, geometry.width)


def decode_decord(path: str, container, stream, targets: np.ndarray, geometry: Geometry,
                  threads: int) -> np.ndarray:
    """decord: timestamps from its index, get_batch on the chosen frames, scaled while decoding."""
    for _ in range(3):
        try:
            return _decode_decord(path, container, stream, targets, geometry, threads)
        except _SizeQuirk:
            geometry = _widen(geometry, stream.codec_context.height, stream.codec_context.width)
    raise DecodeError("corrupt", f"{path}: decord cannot return frames of this size; use backend='pyav'")


def _decode_decord(path: str, container, stream, targets: np.ndarray, geometry: Geometry,
                   threads: int) -> np.ndarray:
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), width=geometry.resized_width,
                                    height=geometry.resized_height, num_threads=threads)
    except Exception as e:
        raise _damaged(path, "decord cannot open it", e) from None
    try:
        n = len(reader)
        if n == 0:
            raise DecodeError("corrupt", f"{path}: decord finds no frames")
        times = reader.get_frame_timestamp(np.arange(n))  # (n, 2): start, end seconds of each frame
        starts = times[:, 0] - times[0, 0]
        if np.any(np.diff(starts) < 0):
            raise DecodeError("corrupt", f"{path}: decord's frame times are out of order")
        end = float(times[-1, 1] - times[0, 0])
        if targets[-1] > end - TIME_TOLERANCE:
            raise _shortfall(path, container, stream, end, targets)
        index = select_frames(starts, targets)
        unique, inverse = np.unique(index, return_inverse=True)
        batch = reader.get_batch(unique.tolist()).asnumpy()  # (U, rh, rw, 3) uint8
    except DecodeError:
        raise
    except Exception as e:  # decord raises its own DECORDError / RuntimeError on bad data
        if "DECORDArrayCopyFromTo" in str(e):
            raise _SizeQuirk from None
        raise DecodeError("corrupt", f"{path}: decord failed reading frames ({_first_line(e)})") from None
    finally:
        del reader
    expected = (len(unique), geometry.resized_height, geometry.resized_width, 3)
    if batch.shape != expected:
        raise DecodeError("corrupt", f"{path}: decord returned frames of shape {batch.shape}, not {expected}")
    return to_model_range(batch[inverse.reshape(-1)], geometry)


class _Overshot(Exception):
    """The seek landed after the first target time: decode again from the beginning."""


def decode_pyav(path: str, container, stream, targets: np.ndarray, geometry: Geometry,
                threads: int) -> np.ndarray:
    """PyAV: seek to the keyframe before the first target time, decode forward, convert only the
    frames chosen."""
    context = stream.codec_context
    context.thread_count = threads
    if threads > 1:
        context.thread_type = "AUTO"
    try:
        if targets[0] > TIME_TOLERANCE:
            try:
                return _decode_forward(path, container, stream, targets, geometry, seek=True)
            except _Overshot:  # rare (inexact indexes): start over from the first frame
                container.seek(stream.start_time or 0, stream=stream, backward=True, any_frame=False)
        return _decode_forward(path, container, stream, targets, geometry, seek=False)
    except DecodeError:
        raise
    except Exception as e:  # a demuxer or decoder error: a damaged file or a cut-off one
        raise _damaged(path, "decoding failed", e) from None


def _decode_forward(path: str, container, stream, targets: np.ndarray, geometry: Geometry,
                    *, seek: bool) -> np.ndarray:
    tb = float(stream.time_base)
    origin = stream.start_time or 0
    period = _frame_period(stream)
    if seek:
        container.seek(origin + int(targets[0] / tb), stream=stream, backward=True, any_frame=False)

    def convert(frame) -> np.ndarray:  # (rh, rw, 3) uint8, scaled inside libswscale
        return frame.to_ndarray(width=geometry.resized_width, height=geometry.resized_height,
                                format="rgb24", interpolation="BICUBIC")

    picks: list[np.ndarray] = []
    held = held_pixels = None  # the latest frame at or before the next target, converted lazily
    held_time, held_duration = 0.0, period
    for packet in container.demux(stream):
        for frame in packet.decode():
            time = (frame.pts - origin) * tb if frame.pts is not None else held_time + held_duration
            if time < -TIME_TOLERANCE:
                continue  # pre-roll an edit list hides
            if held is None and seek and time > targets[0] + TIME_TOLERANCE:
                raise _Overshot
            while len(picks) < len(targets) and time > targets[len(picks)] + TIME_TOLERANCE:
                if held is None:  # targets before the first frame take the first frame
                    held, held_time = frame, time
                if held_pixels is None:
                    held_pixels = convert(held)
                picks.append(held_pixels)
            if len(picks) == len(targets):
                return to_model_range(np.stack(picks), geometry)
            if frame is not held:
                held, held_pixels, held_time = frame, None, time
                held_duration = (frame.duration or 0) * tb or period
    if held is None:
        raise RuntimeError("no frame could be decoded")  # decode_pyav asks whether the file is cut
    end = held_time + held_duration  # the last frame is shown until the end of the stream
    while len(picks) < len(targets) and targets[len(picks)] <= end - TIME_TOLERANCE:
        if held_pixels is None:
            held_pixels = convert(held)
        picks.append(held_pixels)
    if len(picks) < len(targets):
        raise _shortfall(path, container, stream, end, targets)
    return to_model_range(np.stack(picks), geometry)
