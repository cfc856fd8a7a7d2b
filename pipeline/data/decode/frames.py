"""Frame choice and pixels: which source frame each clip time takes, crop and scale (see video.py)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.decode.buckets import TIME_TOLERANCE


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


def resize_crop(frames: np.ndarray, height: int, width: int, rotation: int = 0) -> torch.Tensor:
    """(T, h, w, 3) uint8 RGB -> (T, 3, height, width) uint8: turned upright (`rotation`: degrees
    counter-clockwise the stored frames are shown turned, from the display matrix), crop_box, then
    bilinear scaling with antialiasing (torch's uint8 kernel: about 4x faster than libswscale's bicubic)."""
    if rotation % 360:
        frames = np.rot90(frames, k=(rotation % 360) // 90, axes=(1, 2))  # as ffmpeg's autorotate shows it
    top, left, ch, cw = crop_box(frames.shape[1], frames.shape[2], height, width)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, h, w) channels-last
    x = x[:, :, top:top + ch, left:left + cw]
    if (ch, cw) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x


def to_model_range(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) uint8 -> (3, T, H, W) float32 in [-1, 1]."""
    return uint8_to_model_range(frames.permute(1, 0, 2, 3)).numpy()


def to_channels_first(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) uint8 -> (3, T, H, W) uint8: what travels between the precompute stages (4x fewer
    bytes than float32); the encoder makes it float with uint8_to_model_range."""
    return frames.permute(1, 0, 2, 3).contiguous().numpy()


def uint8_to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape, any device) -> float32 in [-1, 1], the same numbers on CPU and GPU."""
    out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
    out.copy_(pixels)
    return out.mul_(1 / 127.5).sub_(1.0)
