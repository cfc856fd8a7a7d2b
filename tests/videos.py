"""Test videos made with the ffmpeg binary shipped by imageio-ffmpeg.

Every video is tiny (tens of pixels, a few dozen frames) so the whole set is made in a few
seconds. Every real video shows, in frame k, the number k as a 3x3 grid of black/white cells
(bit i of k -> cell i, row-major, white = 1) drawn over the central square of the frame on a
grey background. The code survives compression, resizing and a center crop to any square bucket
or to a bucket of the source's own aspect ratio, so a test can read back which source frame a
decoder chose: `read_frame_index(frame)` on one decoded (3, H, W) frame in [-1, 1].

Pytest fixtures (tests/conftest.py, session-scoped, made once per test session):

- `test_videos` -> `VideoSet`. Videos are `MadeVideo`s (path, codec, width, height, fps,
  num_frames, timestamps: every frame's time in seconds); the undecodable files are Paths.
  H.264 files have B-frames and a keyframe exactly every 10 frames (MPEG-4, VP9: at most 10 apart).
    h264_mp4, mpeg4_avi, vp9_webm, h264_mkv   containers and codecs, 64x48, 30 fps, 2 s
    fps24, fps30, fps60                        64x64 H.264 MP4, 3 s
    vfr                                        64x64 H.264 MKV, 30 fps for 1 s then 10 fps for 2 s
                                               (VFR_TIMESTAMPS)
    landscape (96x48), portrait (48x96)        H.264 MP4, 30 fps, 2 s
    too_short                                  64x64 H.264 MP4, 5 frames at 30 fps (0.17 s)
    truncated        MadeVideo of the intact file; the file itself is H.264 MP4 with its index
                     (moov) first and the last 60% of the bytes cut off: the header claims 3 s,
                     0.5 s can be decoded
    truncated_index  H.264 MP4, index last, cut in half: the index is gone too
    corrupt          the Matroska magic number followed by random bytes
    text_mp4         a text file named .mp4
    audio_only       an MP4 with only an AAC audio track
    missing          a path that does not exist
  `VideoSet.good()` lists the decodable ones, `VideoSet.bad()` maps the others to the
  DecodeError reason they must produce.
- `make_video` -> `make_video(name, **kwargs)`: one more video, `name` a file name whose suffix
  picks the container, kwargs those of `make_video()` below (codec, width, height, fps,
  num_frames, gop, timestamps, faststart), made once per session and name.

Outside pytest: `make_test_videos(folder)` returns the same `VideoSet`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GRID = 3  # the code is a GRID x GRID grid of cells: frame indices 0 .. 2**(GRID*GRID) - 1
CODECS = {  # codec name -> ffmpeg encoder arguments (fast, small, decodable everywhere)
    # B-frames on (veryfast), so decoders must reorder; no scene-cut keyframes: exactly every `gop`.
    "h264": ["-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p", "-sc_threshold", "0"],
    "mpeg4": ["-c:v", "mpeg4", "-q:v", "2", "-pix_fmt", "yuv420p"],
    "vp9": ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-crf", "20", "-b:v", "0",
            "-pix_fmt", "yuv420p"],
}


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def index_pattern(k: int, height: int, width: int) -> np.ndarray:
    """Frame k's picture: (height, width, 3) uint8, the bits of k over the central square."""
    if not 0 <= k < 2 ** (GRID * GRID):
        raise ValueError(f"frame index {k} does not fit in a {GRID}x{GRID} code; make shorter videos")
    img = np.full((height, width, 3), 128, np.uint8)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    for bit in range(GRID * GRID):
        r, c = divmod(bit, GRID)
        y0, y1 = top + r * side // GRID, top + (r + 1) * side // GRID
        x0, x1 = left + c * side // GRID, left + (c + 1) * side // GRID
        img[y0:y1, x0:x1] = 255 if (k >> bit) & 1 else 0
    return img


def read_frame_index(frame: np.ndarray) -> int:
    """Inverse of index_pattern on a decoded (3, H, W) frame in [-1, 1] (or (H, W, 3) uint8)."""
    frame = np.asarray(frame, np.float32)
    if frame.ndim == 3 and frame.shape[-1] == 3 and frame.shape[0] != 3:
        frame = frame.transpose(2, 0, 1) / 127.5 - 1.0
    gray = frame.mean(axis=0)  # (H, W)
    height, width = gray.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    k = 0
    for bit in range(GRID * GRID):
        r, c = divmod(bit, GRID)
        cell = side / GRID
        # Only the middle half of each cell: edges blur under compression and resizing.
        y0, y1 = top + int((r + 0.25) * cell), top + int((r + 0.75) * cell)
        x0, x1 = left + int((c + 0.25) * cell), left + int((c + 0.75) * cell)
        if gray[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)].mean() > 0:
            k |= 1 << bit
    return k


@dataclass(frozen=True, kw_only=True)
class MadeVideo:
    """One test video and what it holds."""

    path: Path
    """Where it is."""
    codec: str
    """"h264", "mpeg4", "vp9", or "" for files that are not videos."""
    width: int
    """Frame width in pixels."""
    height: int
    """Frame height in pixels."""
    fps: float
    """Average frame rate (frames / duration)."""
    num_frames: int
    """Frames written."""
    timestamps: tuple[float, ...]
    """Presentation time of every frame, seconds from the first."""

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


def make_video(
    path: Path | str,
    *,
    codec: str = "h264",
    width: int = 64,
    height: int = 64,
    fps: float = 30.0,
    num_frames: int = 60,
    gop: int = 10,
    timestamps: list[float] | None = None,
    faststart: bool = False,
    extra_args: tuple[str, ...] = (),
) -> MadeVideo:
    """Encodes num_frames index-pattern frames into path (the container follows the suffix).

    timestamps: per-frame presentation times in seconds for a variable-frame-rate file (use a
    .mkv path: Matroska keeps any timestamp to the millisecond); None gives constant fps.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [ffmpeg_exe(), "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-r", str(fps), "-i", "-"]
    if timestamps is not None:
        if len(timestamps) != num_frames:
            raise ValueError(f"{len(timestamps)} timestamps for {num_frames} frames")
        ms = [round(t * 1000) for t in timestamps]
        # One setpts term per frame, in milliseconds (settb makes the time base 1/1000, so the
        # numbers are exact); -fps_mode passthrough keeps them instead of resampling to a rate.
        expr = "+".join(f"eq(N,{i})*{t}" for i, t in enumerate(ms))
        cmd += ["-vf", f"settb=1/1000,setpts='{expr}'", "-fps_mode", "passthrough", "-enc_time_base", "1/1000"]
    cmd += CODECS[codec] + ["-g", str(gop)]
    if faststart:
        cmd += ["-movflags", "+faststart"]
    cmd += [*extra_args, str(path)]
    frames = np.stack([index_pattern(k, height, width) for k in range(num_frames)])
    subprocess.run(cmd, input=frames.tobytes(), check=True, capture_output=True)
    if timestamps is None:
        timestamps = [k / fps for k in range(num_frames)]
        avg_fps = fps
    else:
        timestamps = [t / 1000 for t in ms]  # what the file holds
        # ffmpeg gives the last frame the nominal duration 1/fps: the file lasts until then.
        avg_fps = num_frames / (timestamps[-1] - timestamps[0] + 1.0 / fps)
    return MadeVideo(path=path, codec=codec, width=width, height=height, fps=avg_fps,
                     num_frames=num_frames, timestamps=tuple(timestamps))


def truncate_file(src: Path, dst: Path, keep: float) -> Path:
    """Copies the first `keep` fraction of src's bytes to dst (a file cut off mid-download)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


VFR_TIMESTAMPS = [k / 30 for k in range(30)] + [1.0 + k / 10 for k in range(20)]
"""The vfr video: 30 frames at 30 fps (0 .. 0.967 s), then 20 frames at 10 fps (1.0 .. 2.9 s)."""


@dataclass(frozen=True, kw_only=True)
class VideoSet:
    """The session's test videos (see the module docstring)."""

    h264_mp4: MadeVideo
    mpeg4_avi: MadeVideo
    vp9_webm: MadeVideo
    h264_mkv: MadeVideo
    fps24: MadeVideo
    fps30: MadeVideo
    fps60: MadeVideo
    vfr: MadeVideo
    landscape: MadeVideo
    portrait: MadeVideo
    too_short: MadeVideo
    truncated: MadeVideo
    truncated_index: Path
    corrupt: Path
    text_mp4: Path
    audio_only: Path
    missing: Path

    def good(self) -> dict[str, MadeVideo]:
        """Name -> every decodable video (too_short decodes, but only a few frames)."""
        names = ["h264_mp4", "mpeg4_avi", "vp9_webm", "h264_mkv", "fps24", "fps30", "fps60", "vfr",
                 "landscape", "portrait", "too_short"]
        return {n: getattr(self, n) for n in names}

    def bad(self) -> dict[str, tuple[Path, str]]:
        """Name -> (path, the DecodeError reason from probe + plan_clips + decode_clips) for any
        clip longer than 0.6 s (too_short lasts 0.17 s; truncated holds 0.5 s of its 3 s)."""
        return {
            "too_short": (self.too_short.path, "too_short"),
            "truncated": (self.truncated.path, "truncated"),
            "truncated_index": (self.truncated_index, "truncated"),
            "corrupt": (self.corrupt, "corrupt"),
            "text_mp4": (self.text_mp4, "not_a_video"),
            "audio_only": (self.audio_only, "not_a_video"),
            "missing": (self.missing, "missing"),
        }


def make_test_videos(folder: Path | str) -> VideoSet:
    """Makes the whole set into folder (about a second or two on one core)."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    small = dict(width=64, height=48, fps=30.0, num_frames=60)
    full = make_video(d / "truncated_source.mp4", num_frames=90, faststart=True)
    truncated = truncate_file(full.path, d / "truncated.mp4", keep=0.4)
    plain = make_video(d / "index_last_source.mp4", num_frames=60)
    truncated_index = truncate_file(plain.path, d / "truncated_index.mp4", keep=0.5)
    mkv = make_video(d / "corrupt_source.mkv", num_frames=30)
    corrupt = d / "corrupt.mkv"
    noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    corrupt.write_bytes(mkv.path.read_bytes()[:4] + noise)  # the EBML magic, then nothing valid
    text = d / "not_a_video.mp4"
    text.write_text("this is a caption, not a video\n" * 20)
    audio = d / "audio_only.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=0.5",
                    "-c:a", "aac", str(audio)], check=True, capture_output=True)
    return VideoSet(
        h264_mp4=make_video(d / "h264.mp4", codec="h264", **small),
        mpeg4_avi=make_video(d / "mpeg4.avi", codec="mpeg4", **small),
        vp9_webm=make_video(d / "vp9.webm", codec="vp9", **small),
        h264_mkv=make_video(d / "h264.mkv", codec="h264", **small),
        fps24=make_video(d / "fps24.mp4", fps=24.0, num_frames=72),
        fps30=make_video(d / "fps30.mp4", fps=30.0, num_frames=90),
        fps60=make_video(d / "fps60.mp4", fps=60.0, num_frames=180),
        vfr=make_video(d / "vfr.mkv", fps=30.0, num_frames=len(VFR_TIMESTAMPS), timestamps=VFR_TIMESTAMPS),
        landscape=make_video(d / "landscape.mp4", width=96, height=48, num_frames=60),
        portrait=make_video(d / "portrait.mp4", width=48, height=96, num_frames=60),
        too_short=make_video(d / "too_short.mp4", num_frames=5),
        truncated=MadeVideo(path=truncated, codec="h264", width=64, height=64, fps=30.0, num_frames=90,
                            timestamps=full.timestamps),
        truncated_index=truncated_index,
        corrupt=corrupt,
        text_mp4=text,
        audio_only=audio,
        missing=d / "does_not_exist.mp4",
    )


VideoFactory = Callable[..., MadeVideo]
