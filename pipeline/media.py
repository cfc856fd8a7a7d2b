"""Writing and reading videos: MP4 (H.264 through imageio-ffmpeg's ffmpeg binary) and GIF previews.

Used by the sampler, the trainer's validation, the demo data set and the detector. A video is either a
float tensor/array (3, T, H, W) in [-1, 1] (what the VAE decodes to) or uint8 frames (T, H, W, 3).
torch is never imported here: tensors are converted by duck typing (`.detach()`), so the data tools stay
light.

Tiny videos (the demo's 16x16 or 32x32 clips) are unwatchable at their own size, so writers take an
integer nearest-neighbour `scale`; `None` picks the smallest factor that makes the short side at least
`PREVIEW_MIN_SIDE` pixels. H.264 in yuv420p needs even sizes: an odd height or width is padded by
repeating the last row or column (so a reader gets the padded, even size back).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import numpy as np

# Short side, in pixels, that `scale=None` upscales previews to (integer factors only).
PREVIEW_MIN_SIDE = 128


def to_uint8_frames(video: Any) -> np.ndarray:
    """Convert a video to uint8 frames (T, H, W, 3).

    Accepts a torch tensor or numpy array, either float (3, T, H, W) in [-1, 1] (values outside are
    clipped) or uint8 (T, H, W, 3) (returned as is, made contiguous).
    """
    if hasattr(video, "detach"):  # a torch tensor, without importing torch
        video = video.detach().cpu()
        # bfloat16 has no numpy dtype: go through float32; integer tensors keep their dtype
        video = video.float().numpy() if video.dtype.is_floating_point else video.numpy()
    array = np.asarray(video)
    if array.dtype == np.uint8:
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(
                f"uint8 video must have shape (T, H, W, 3), got {array.shape}; "
                "pass float videos as (3, T, H, W) in [-1, 1]"
            )
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"video dtype must be uint8 or floating point, got {array.dtype}")
    if array.ndim != 4 or array.shape[0] != 3:
        raise ValueError(
            f"float video must have shape (3, T, H, W) with values in [-1, 1], got {array.shape}; "
            "pass uint8 videos as (T, H, W, 3)"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("video contains NaN or infinite values; check the model/VAE output")
    frames = (np.clip(array, -1.0, 1.0) + 1.0) * 127.5  # (3, T, H, W) in [0, 255]
    return np.ascontiguousarray(np.round(frames).astype(np.uint8).transpose(1, 2, 3, 0))


def frames_to_video(frames: np.ndarray) -> np.ndarray:
    """uint8 frames (T, H, W, 3) -> float32 video (3, T, H, W) in [-1, 1] (inverse of to_uint8_frames)."""
    frames = to_uint8_frames(frames)
    return (frames.transpose(3, 0, 1, 2).astype(np.float32) / 127.5) - 1.0


def preview_scale(height: int, width: int, min_side: int = PREVIEW_MIN_SIDE) -> int:
    """Smallest integer factor that makes min(height, width) at least `min_side` (1 if already)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"video size must be positive, got height={height} width={width}")
    return max(1, -(-min_side // min(height, width)))


def upscale_nearest(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 frames (T, H, W, 3) by an integer factor."""
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    if scale == 1:
        return frames
    return frames.repeat(scale, axis=1).repeat(scale, axis=2)


def _prepare(video: Any, scale: int | None, even: bool) -> np.ndarray:
    frames = to_uint8_frames(video)
    if frames.shape[0] == 0:
        raise ValueError("video has no frames (T == 0); nothing to write")
    _, height, width, _ = frames.shape
    frames = upscale_nearest(frames, preview_scale(height, width) if scale is None else scale)
    if even:
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(frames)


def _check_fps(fps: float) -> None:
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")


def _atomic_target(path: str | os.PathLike, suffix: str) -> tuple[Path, str]:
    """Make the parent folder and return (path, temporary path beside it) for an atomic replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to the final file; a unique name is enough here.
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    return path, tmp


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary shipped by imageio-ffmpeg."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def write_mp4(
    video: Any,
    path: str | os.PathLike,
    *,
    fps: float = 8.0,
    scale: int | None = 1,
    crf: int = 18,
    preset: str = "medium",
) -> Path:
    """Write a video to an H.264 (yuv420p) MP4 and return its path.

    video: float (3, T, H, W) in [-1, 1] or uint8 (T, H, W, 3). scale: integer nearest-neighbour
    factor, or None for a viewing size (see `preview_scale`). crf: x264 quality (0 lossless luma, 18
    visually clean, 23 default). The file appears atomically: a crash leaves no half-written MP4.
    """
    _check_fps(fps)
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in [0, 51] (x264 quality; 18 is visually clean), got {crf}")
    frames = _prepare(video, scale, even=True)
    num_frames, height, width, _ = frames.shape
    path, tmp = _atomic_target(path, ".mp4")
    command = [
        ffmpeg_exe(), "-y", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{fps}", "-i", "-",
        "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
        "-movflags", "+faststart", "-f", "mp4", tmp,
    ]  # fmt: skip
    try:
        result = subprocess.run(command, input=frames.tobytes(), capture_output=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"ffmpeg failed writing {path} ({num_frames} frames of {width}x{height}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_gif(video: Any, path: str | os.PathLike, *, fps: float = 8.0, scale: int | None = None) -> Path:
    """Write an animated, looping GIF preview (Pillow) and return its path. Arguments as `write_mp4`."""
    from PIL import Image

    _check_fps(fps)
    frames = _prepare(video, scale, even=False)
    images = [Image.fromarray(frame) for frame in frames]
    path, tmp = _atomic_target(path, ".gif")
    try:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            # GIF stores centiseconds per frame (browsers slow down delays under 2 cs); identical
            # consecutive frames are merged by Pillow into one longer frame, same playback.
            duration=max(2, round(100.0 / fps)) * 10,
            loop=0,
            optimize=False,  # optimising merges near-identical frames, changing the frame count
            disposal=1,
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_video_and_preview(
    video: Any, stem: str | os.PathLike, *, fps: float = 8.0, scale: int | None = None
) -> tuple[Path, Path]:
    """Write `<stem>.mp4` and `<stem>.gif` at a viewing size; returns (mp4 path, gif path)."""
    stem = Path(stem)
    mp4 = write_mp4(video, stem.with_name(stem.name + ".mp4"), fps=fps, scale=scale)
    gif = write_gif(video, stem.with_name(stem.name + ".gif"), fps=fps, scale=scale)
    return mp4, gif


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video file (MP4 or anything ffmpeg reads) to uint8 frames (T, H, W, 3)."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(chunk, dtype=np.uint8).reshape(height, width, 3) for chunk in reader]
    except (OSError, RuntimeError, StopIteration) as error:
        raise ValueError(f"cannot decode {path} as a video: {error}") from error
    if not frames:
        raise ValueError(f"{path} decoded to zero frames; the file is empty or not a video")
    return np.stack(frames)
