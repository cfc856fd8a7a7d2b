"""pipeline.media: MP4 and GIF writing, reading back, sizes, scaling and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import media


def flat_video(frames: int, height: int, width: int, rgb: tuple[int, int, int]) -> np.ndarray:
    """uint8 (T, H, W, 3) of one colour, with a frame index stripe so frames differ."""
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = np.asarray(rgb, dtype=np.uint8)
    for t in range(frames):
        video[t, 0, t % width] = 255
    return video


def test_to_uint8_frames_maps_range_and_layout():
    video = torch.zeros(3, 2, 4, 6)
    video[0] = 1.0  # red channel full
    video[2] = -1.0  # blue channel empty
    frames = media.to_uint8_frames(video)
    assert frames.shape == (2, 4, 6, 3) and frames.dtype == np.uint8
    assert tuple(frames[0, 0, 0]) == (255, 128, 0)
    # Out-of-range values are clipped, bfloat16 tensors work, the inverse maps back within rounding.
    assert media.to_uint8_frames((video * 3).to(torch.bfloat16))[0, 0, 0, 0] == 255
    back = media.frames_to_video(frames)
    assert back.shape == (3, 2, 4, 6) and np.abs(back - video.numpy()).max() <= 1 / 127.5


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 4, 4, 3), np.float32), r"\(3, T, H, W\)"),
        (np.zeros((3, 2, 4, 4), np.uint8), r"\(T, H, W, 3\)"),
        (np.zeros((3, 2, 4, 4), np.int64), "dtype"),
        (np.full((3, 2, 4, 4), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_videos_are_rejected_with_a_clear_error(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        media.write_mp4(bad, tmp_path / "bad.mp4")


@pytest.mark.parametrize(
    "frames, height, width, scale, expected_hw",
    [
        (8, 16, 16, 1, (16, 16)),  # the demo's tiny size, as is
        (8, 16, 16, 4, (64, 64)),  # integer nearest-neighbour upscaling
        (8, 16, 16, None, (128, 128)),  # automatic viewing size
        (5, 15, 13, 1, (16, 14)),  # odd sizes padded to even for yuv420p
        (3, 24, 40, 1, (24, 40)),
    ],
)
def test_mp4_roundtrip_frame_count_and_size(frames, height, width, scale, expected_hw, tmp_path):
    rng = np.random.default_rng(0)
    video = torch.from_numpy(rng.uniform(-1, 1, (3, frames, height, width)).astype(np.float32))
    path = media.write_mp4(video, tmp_path / "sub" / "clip.mp4", fps=8, scale=scale)
    assert path.is_file() and path.stat().st_size > 0
    decoded = media.read_video(path)
    assert decoded.shape == (frames, *expected_hw, 3) and decoded.dtype == np.uint8
    assert not list(path.parent.glob(".*tmp*")), "temporary files must be renamed or removed"


def test_mp4_keeps_colours_of_flat_regions(tmp_path):
    # Flat colour regions survive H.264/yuv420p almost exactly; this is what the detector relies on.
    video = flat_video(6, 32, 32, (230, 30, 30))
    video[:, 16:, :] = (40, 80, 255)
    decoded = media.read_video(media.write_mp4(video, tmp_path / "c.mp4", crf=12))
    assert np.abs(decoded[:, 2:14, 2:30].astype(int) - (230, 30, 30)).max() <= 8
    assert np.abs(decoded[:, 18:30, 2:30].astype(int) - (40, 80, 255)).max() <= 8


def test_upscaled_mp4_is_nearest_neighbour(tmp_path):
    video = flat_video(4, 8, 8, (0, 0, 0))
    video[:, :4, :4] = 255  # top-left white quarter
    decoded = media.read_video(media.write_mp4(video, tmp_path / "u.mp4", scale=4, crf=0))
    assert decoded.shape == (4, 32, 32, 3)
    assert decoded[:, 2:14, 2:14].min() >= 245 and decoded[:, 18:30, 18:30].max() <= 10


def test_gif_preview_opens_with_all_frames(tmp_path):
    video = np.linspace(-1, 1, 3 * 6 * 16 * 16, dtype=np.float32).reshape(3, 6, 16, 16)
    path = media.write_gif(video, tmp_path / "p.gif", fps=8)
    with Image.open(path) as image:
        assert image.format == "GIF" and image.size == (128, 128) and image.n_frames == 6
        assert image.info["duration"] == 120 and image.info["loop"] == 0
    with Image.open(media.write_gif(video, tmp_path / "q.gif", scale=1)) as image:
        assert image.size == (16, 16)


def test_write_video_and_preview_writes_both(tmp_path):
    video = flat_video(3, 16, 16, (30, 210, 40))
    mp4, gif = media.write_video_and_preview(video, tmp_path / "out" / "sample_0", fps=4)
    assert mp4.name == "sample_0.mp4" and gif.name == "sample_0.gif"
    assert media.read_video(mp4).shape == (3, 128, 128, 3)
    with Image.open(gif) as image:
        assert image.n_frames == 3


def test_scale_and_fps_are_validated(tmp_path):
    video = flat_video(2, 8, 8, (0, 0, 0))
    with pytest.raises(ValueError, match="scale"):
        media.write_mp4(video, tmp_path / "a.mp4", scale=0)
    with pytest.raises(ValueError, match="fps"):
        media.write_gif(video, tmp_path / "a.gif", fps=0)
    with pytest.raises(ValueError, match="crf"):
        media.write_mp4(video, tmp_path / "a.mp4", crf=60)
    assert media.preview_scale(16, 16) == 8 and media.preview_scale(200, 300) == 1


def test_read_video_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        media.read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video")
    with pytest.raises(ValueError, match="junk.mp4"):
        media.read_video(junk)
