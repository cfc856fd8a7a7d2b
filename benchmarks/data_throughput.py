"""Data throughput: how fast videos become training clips.

Decode part (this file, so far): decoded clips per second per CPU core, decord against PyAV,
17 frames at 256x256 sampled at 8 fps from 720p H.264 sources made with ffmpeg in a temporary
folder (x264 defaults: B-frames, a keyframe every 250 frames). One process, one decoder thread
(`threads=1`), the way one Ray CPU task decodes: each video is probed and planned
(pipeline.data.decode.plan_clips: up to --clips-per-video non-overlapping clips), then its clips
are decoded in one pass (decode_clips), or one by one (decode_clip, the "per clip" rows: each
clip decodes again from the keyframe before it). "clips/CPU-s" divides by the process's CPU
time, so it stays a per-core figure on a busy machine; "clips/s" is wall time. A naive baseline
(PyAV converts every frame at full size, torch resizes the chosen ones in float32) shows what
converting only the chosen frames saves.

Each measurement is a function returning a Row; main() runs the selected ones and prints a table.

    python benchmarks/data_throughput.py
    python benchmarks/data_throughput.py --videos 8 --seconds 20 --measure decord pyav
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.buckets import Bucket, BucketTable
from pipeline.data.decode import crop_box, decode_clip, decode_clips, plan_clips, probe
from pipeline.data.manifest import VideoRecord


@dataclass(kw_only=True)
class Row:
    """One line of the table."""

    measurement: str
    """What ran."""
    clips: int
    """Clips produced."""
    wall_s: float
    """Wall-clock seconds."""
    cpu_s: float
    """CPU seconds of this process (all its threads)."""
    note: str = ""
    """Anything needed to read the numbers."""

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.wall_s

    @property
    def clips_per_cpu_s(self) -> float:
        return self.clips / self.cpu_s


def make_sources(folder: Path, *, count: int, seconds: float, width: int = 1280, height: int = 720,
                 fps: int = 30) -> list[Path]:
    """count H.264 MP4s of moving test pictures (x264 defaults: B-frames, keyframe every 250)."""
    import imageio_ffmpeg

    paths = []
    for i in range(count):
        path = folder / f"source_{i}_{width}x{height}_{seconds:g}s.mp4"
        if path.exists():  # --keep folder from an earlier run
            paths.append(path)
            continue
        # Different start offsets so the files differ (mandelbrot-free testsrc2 is cheap to make).
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i",
                        f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds + i * 0.1}",
                        "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
                        str(path.with_suffix(".part.mp4"))], check=True, capture_output=True)
        path.with_suffix(".part.mp4").rename(path)  # complete files only, for --keep
        paths.append(path)
    return paths


def _timed(fn) -> tuple[int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    clips = fn()
    return clips, time.perf_counter() - wall, time.process_time() - cpu


def _plans(paths: list[Path], bucket: Bucket, fps: float, clips_per_video: int):
    table = BucketTable(buckets=(bucket,))
    for i, path in enumerate(paths):
        record = VideoRecord(path=str(path.absolute()), caption="x", source_row=i, source="benchmark")
        yield path, plan_clips(record, probe(path), table, fps, clips_per_video)


def measure_decode(paths: list[Path], *, backend: str, bucket: Bucket, fps: float, clips_per_video: int,
                   per_clip: bool = False) -> Row:
    """probe + plan, then decode_clips once per video (all its clips in one pass), or
    decode_clip once per clip (per_clip), one decoder thread."""

    def run() -> int:
        clips = 0
        for path, plans in _plans(paths, bucket, fps, clips_per_video):
            kw = dict(frames=bucket.frames, height=bucket.height, width=bucket.width, fps=fps, backend=backend,
                      threads=1)
            if per_clip:
                out = [decode_clip(path, start=plan.start, **kw) for plan in plans]
            else:
                out = decode_clips(path, starts=[plan.start for plan in plans], **kw)
            assert all(c.shape == (3, bucket.frames, bucket.height, bucket.width) for c in out)
            clips += len(out)
        return clips

    clips, wall, cpu = _timed(run)
    how = "decode_clip per clip" if per_clip else "decode_clips per video"
    return Row(measurement=f"{backend}: {how}", clips=clips, wall_s=wall, cpu_s=cpu)


def measure_naive(paths: list[Path], *, bucket: Bucket, fps: float, clips_per_video: int) -> Row:
    """Baseline: PyAV decodes and converts every frame at full size, torch resizes the chosen."""
    import av
    import torch.nn.functional as F

    def run() -> int:
        clips = 0
        for path, plans in _plans(paths, bucket, fps, clips_per_video):
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.codec_context.thread_count = 1
                frames = [(f.time, f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
            times = np.array([t for t, _ in frames])
            for plan in plans:
                targets = plan.start + np.arange(bucket.frames) / fps
                index = np.searchsorted(times, targets + 1e-3, side="right") - 1
                video = torch.from_numpy(np.stack([frames[i][1] for i in index]))  # (T, h, w, 3)
                top, left, ch, cw = crop_box(video.shape[1], video.shape[2], bucket.height, bucket.width)
                video = video[:, top:top + ch, left:left + cw].permute(0, 3, 1, 2).float()  # (T, 3, ch, cw)
                video = F.interpolate(video, size=(bucket.height, bucket.width), mode="bilinear",
                                      antialias=True, align_corners=False) / 127.5 - 1
                assert video.permute(1, 0, 2, 3).shape == (3, bucket.frames, bucket.height, bucket.width)
                clips += 1
        return clips

    clips, wall, cpu = _timed(run)
    return Row(measurement="naive: PyAV all frames + torch resize", clips=clips, wall_s=wall, cpu_s=cpu)


MEASUREMENTS = {
    "decord": lambda paths, **kw: measure_decode(paths, backend="decord", **kw),
    "pyav": lambda paths, **kw: measure_decode(paths, backend="pyav", **kw),
    "decord-per-clip": lambda paths, **kw: measure_decode(paths, backend="decord", per_clip=True, **kw),
    "pyav-per-clip": lambda paths, **kw: measure_decode(paths, backend="pyav", per_clip=True, **kw),
    "naive": measure_naive,
}


def format_table(rows: list[Row]) -> str:
    header = f"{'measurement':<40} {'clips':>6} {'wall s':>8} {'clips/s':>8} {'clips/CPU-s':>12} {'ms/clip':>8}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.measurement:<40} {r.clips:>6} {r.wall_s:>8.2f} {r.clips_per_s:>8.2f} "
                     f"{r.clips_per_cpu_s:>12.2f} {1000 * r.wall_s / r.clips:>8.1f}  {r.note}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=4, help="source videos to make")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each source")
    parser.add_argument("--size", default="1280x720", help="source WIDTHxHEIGHT")
    parser.add_argument("--bucket", default="17x256x256", help="FRAMESxHEIGHTxWIDTH of a clip")
    parser.add_argument("--fps", type=float, default=8.0, help="clip frame rate")
    parser.add_argument("--clips-per-video", type=int, default=4)
    parser.add_argument("--measure", nargs="+", default=list(MEASUREMENTS), choices=list(MEASUREMENTS))
    parser.add_argument("--keep", type=Path, help="make the sources here (and keep them) instead of a temp dir")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    bucket = Bucket.parse(args.bucket)
    torch.set_num_threads(1)  # per core: torch's resize must not spread over the other cores

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        paths = make_sources(folder, count=args.videos, seconds=args.seconds, width=width, height=height)
        made = time.perf_counter() - start
        print(f"# {args.videos} sources {width}x{height} H.264 30 fps, {args.seconds:g} s each (made in "
              f"{made:.1f} s); clips {bucket} at {args.fps:g} fps, up to {args.clips_per_video} per video")
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
              f"1 decoder thread per decode")
        kw = dict(bucket=bucket, fps=args.fps, clips_per_video=args.clips_per_video)
        for name in args.measure:  # warm caches and imports once, off the clock
            MEASUREMENTS[name](paths[:1], **{**kw, "clips_per_video": 1})
        rows = [MEASUREMENTS[name](paths, **kw) for name in args.measure]
    print(format_table(rows))


if __name__ == "__main__":
    main()
