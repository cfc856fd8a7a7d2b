"""Data throughput: how fast videos become training clips.

Decode part (this file, so far): decoded clips per second per CPU core, decord against PyAV,
17 frames at 256x256 sampled at 8 fps from 720p H.264 sources made with ffmpeg in a temporary
folder (x264 defaults: B-frames, a keyframe every 250 frames). One process, one decoder thread
(`threads=1`), the way one Ray CPU task decodes: each video is opened and probed by the reader that
decodes it (open_video: decord's index, or PyAV's walk) and planned (pipeline.data.decode.plan_clips: up
to --clips-per-video non-overlapping clips), then its clips are decoded in one pass (decode_clips), or
one by one (decode_clip, the "per clip" rows: each
clip decodes again from the keyframe before it). "clips/CPU-s" divides by the process's CPU
time, so it stays a per-core figure on a busy machine; "clips/s" is wall time. A naive baseline
(PyAV converts every frame at full size, torch resizes the chosen ones in float32) shows what
converting only the chosen frames saves.

Each measurement is a function returning a Row; main() runs the selected ones and prints a table.

    python benchmarks/data_throughput.py
    python benchmarks/data_throughput.py --videos 8 --seconds 20 --measure decord pyav
    python benchmarks/data_throughput.py --videos 4 --seconds 6 --size 640x360 --bucket 17x128x128 \
        --clips-per-video 2 --repeats 8 --measure decord --utilisation   # encoder utilisation on CPU
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

from pipeline.data.decode.buckets import Bucket, BucketTable
from pipeline.data.decode.container import probe
from pipeline.data.decode.frames import crop_box
from pipeline.data.decode.video import decode_clip, decode_clips, open_video, plan_clips
from pipeline.data.source.manifest import VideoRecord


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
    """As the pipeline's decode task: open_video (one pass: probe by the decoding reader) + plan, then
    decode_clips once per video (all its clips in one pass); or probe + plan, then decode_clip once per
    clip (per_clip, each opening the file). One decoder thread."""
    kw = dict(frames=bucket.frames, height=bucket.height, width=bucket.width, fps=fps, backend=backend, threads=1)
    table = BucketTable(buckets=(bucket,))

    def run() -> int:
        clips = 0
        if per_clip:
            for path, plans in _plans(paths, bucket, fps, clips_per_video):
                out = [decode_clip(path, start=plan.start, **kw) for plan in plans]
                clips += len(out)
            return clips
        for i, path in enumerate(paths):
            record = VideoRecord(path=str(path.absolute()), caption="x", source_row=i, source="benchmark")
            with open_video(path, backend=backend) as video:
                plans = plan_clips(record, video.info, table, fps, clips_per_video)
                out = decode_clips(path, starts=[plan.start for plan in plans], rotation=video.info.rotation,
                                   video=video, **kw)
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


# ---------------------------------------------------------------------------------------------
# End to end: the Ray pipeline (pipeline.data.precompute) against a plain single-process loop doing
# the same work on the same files (probe, plan, decode, VAE, text encoder, write the shards), and on
# a CUDA machine the pipeline's VAE utilisation: its clips/s divided by the VAE's own clips/s.
# The VAE is the CogVideoX architecture with random weights on a GPU (the diffusers defaults are its
# real shape), the pixel codec on CPU; the text encoder is a tiny CLIP on CPU (it is not measured).


def end_to_end_config(folder: Path, paths: list[Path], *, repeats: int, bucket: Bucket, fps: float,
                      clips_per_video: int, vae: str, workers: int):
    """A manifest listing every source `repeats` times (distinct captions) and its PrecomputeConfig."""
    from pipeline.data.encode.text_clip import make_tiny_clip
    from pipeline.data.precompute.config import PrecomputeConfig

    manifest = folder / "manifest.csv"
    lines = ["video,caption"] + [f"{p.absolute()},source {i} copy {r}" for r in range(repeats)
                                 for i, p in enumerate(paths)]
    manifest.write_text("\n".join(lines) + "\n")
    clip = folder / "tiny_clip"
    if not clip.exists():
        make_tiny_clip(clip)
    gpu = vae == "cogvideox"
    return PrecomputeConfig(
        manifest=str(manifest), output=str(folder / "latents"), buckets=bucket.name, fps=fps,
        clips_per_video=clips_per_video, vae=vae, vae_config={} if gpu else {"spatial": 8},
        text_encoder="clip", text_encoder_path=str(clip), rows_per_work_unit=2, vae_batch_size=4,
        num_gpus_per_actor=1 if gpu else 0, text_num_gpus_per_actor=0, decode_num_cpus=1,
        vae_num_cpus=1 if gpu else 0.5, text_num_cpus=0.5, ray_num_cpus=workers, overwrite=True, progress=False)


def measure_loop(config) -> Row:
    """The pipeline's stages called one after the other in this process, unit by unit (models loaded
    before the clock starts)."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.data.precompute.run import describe_text, describe_vae, unit_settings_hash
    from pipeline.data.precompute.stages import TextStage, VAEStage, decode_units, write_units
    from pipeline.data.source.plan import plan_run

    shutil.rmtree(config.output, ignore_errors=True)
    plan = plan_run(config.manifest, rows_per_unit=config.rows_per_work_unit, settings_hash=unit_settings_hash(config),
                    finished=[], write_to=config.output)
    vae = describe_vae(config.vae, config.vae_build_kwargs(), config.buckets)
    text = describe_text(config.text_encoder, config.text_build_kwargs())
    encode = VAEStage(kind=config.vae, build_kwargs=config.vae_build_kwargs(), fingerprint=vae["fingerprint"],
                      batch_size=config.vae_batch_size, num_cpus=1)
    embed = TextStage(kind=config.text_encoder, build_kwargs=config.text_build_kwargs(),
                      fingerprint=text["fingerprint"], batch_size=config.text_batch_size, num_cpus=1)
    keys = [b.name for b in config.bucket_table()]

    def run() -> int:
        clips = 0
        for file in plan.plan_files:
            units = pq.read_table(file)
            for i in range(units.num_rows):
                batch = decode_units(units.slice(i, 1), buckets=config.buckets, fps=config.fps,
                                     clips_per_video=config.clips_per_video, backend=config.decode_backend)
                done = write_units(embed(encode(batch)), output=config.output, storage_dtype=config.storage_dtype,
                                   bucket_keys=keys)
                clips += sum(done.column("rows").to_pylist())
        return clips

    clips, wall, cpu = _timed(run)
    return Row(measurement=f"loop: 1 process, {config.vae} VAE", clips=clips, wall_s=wall, cpu_s=cpu)


def measure_pipeline(config) -> Row:
    """run_precompute on a local Ray of config.ray_num_cpus CPUs; the rate once every actor is up."""
    from pipeline.data.precompute.run import run_precompute

    summary = run_precompute(config)
    steady = summary["steady_clips_per_second"]
    clips = summary["clips_this_run"]
    note = (f"steady rate (first to last unit); {clips / summary['pipeline_seconds']:.2f} clips/s over "
            f"{summary['pipeline_seconds']:.1f} s with actor start-up")
    return Row(measurement=f"ray pipeline: {config.ray_num_cpus} CPUs, {config.vae} VAE", clips=clips,
               wall_s=clips / steady if steady else summary["pipeline_seconds"], cpu_s=float("nan"), note=note)


def measure_vae_alone(config, bucket: Bucket, *, batches: int = 30) -> Row:
    """The VAE by itself on the GPU: batches of vae_batch_size random clips already on the device."""
    from pipeline.data.encode.vae_factory import build_vae

    vae = build_vae(config.vae, **config.vae_build_kwargs())
    video = torch.rand(config.vae_batch_size, 3, bucket.frames, bucket.height, bucket.width, device="cuda") * 2 - 1
    for _ in range(3):  # warm-up: cuDNN algorithm choice, allocator
        vae.encode(video)
    torch.cuda.synchronize()

    def run() -> int:
        for _ in range(batches):
            vae.encode(video)
        torch.cuda.synchronize()
        return batches * config.vae_batch_size

    clips, wall, cpu = _timed(run)
    return Row(measurement=f"VAE alone: {config.vae}, batch {config.vae_batch_size}, {config.vae_build_kwargs()['dtype']}",
               clips=clips, wall_s=wall, cpu_s=cpu)


def object_store_bytes(paths: list[Path], bucket: Bucket, fps: float) -> str:
    """Bytes one decoded clip takes between the decode task and the VAE actor: float32 (before) against
    uint8 (now), measured on the arrays decode_clips returns for the first source."""
    from pipeline.data.decode.frames import uint8_to_model_range

    path, plans = next(_plans(paths[:1], bucket, fps, 1))
    starts = [p.start for p in plans]
    before = decode_clips(path, starts=starts, frames=bucket.frames, height=bucket.height, width=bucket.width, fps=fps)
    now = decode_clips(path, starts=starts, frames=bucket.frames, height=bucket.height, width=bucket.width, fps=fps,
                       uint8=True)
    same = np.array_equal(uint8_to_model_range(torch.from_numpy(now[0])).numpy(), before[0])  # the VAE actor's
    return (f"# object-store bytes per clip {bucket}: float32 {before[0].nbytes:,} (before), uint8 {now[0].nbytes:,} "
            f"(now): {before[0].nbytes / now[0].nbytes:.1f}x fewer; same VAE input: {same}")


def run_end_to_end(folder: Path, paths: list[Path], args, bucket: Bucket) -> list[Row]:
    """Loop and pipeline on the same files; with CUDA also the VAE alone and the utilisation ratio."""
    cuda = torch.cuda.is_available()
    vae = args.vae or ("cogvideox" if cuda else "pixel")
    config = end_to_end_config(folder, paths, repeats=args.repeats, bucket=bucket, fps=args.fps,
                               clips_per_video=args.clips_per_video, vae=vae, workers=args.workers)
    rows = [measure_loop(config), measure_pipeline(config)]
    rows[1].note += f"; {rows[1].clips_per_s / rows[0].clips_per_s:.2f}x the loop"
    if cuda and vae != "pixel":
        alone = measure_vae_alone(config, bucket)
        ratio = rows[1].clips_per_s / alone.clips_per_s
        alone.note = f"pipeline / VAE alone = {ratio:.2f} (target >= 0.9)"
        rows.append(alone)
    return rows


# ---------------------------------------------------------------------------------------------
# Encoder utilisation on a CPU: a CogVideoX-architecture VAE (random weights, float32) slow enough that
# one encoder actor on one core is the bottleneck while one decode task runs on the other core. The
# pipeline's steady clips/s divided by the encoder's own clips/s on the same batches already in memory
# (VAEStage, one thread, uint8 -> float included, as the actor does it). The encoder alone is timed
# before and after the pipeline, in the same run, and the ratio uses their mean: the machine's load moves.

UTILISATION_COG = {
    "block_out_channels": [16, 32, 32], "down_block_types": ["CogVideoXDownBlock3D"] * 3,
    "up_block_types": ["CogVideoXUpBlock3D"] * 3, "latent_channels": 4, "layers_per_block": 1,
    "norm_num_groups": 4, "temporal_compression_ratio": 4, "sample_height": 32, "sample_width": 32,
}


def utilisation_config(folder: Path, paths: list[Path], *, repeats: int, bucket: Bucket, fps: float,
                       clips_per_video: int):
    """End-to-end config on a CPU VAE: one VAE actor (1 CPU, 1 thread), one decode task at a time."""
    import dataclasses

    (folder / "utilisation").mkdir(exist_ok=True)
    config = end_to_end_config(folder / "utilisation", paths, repeats=repeats, bucket=bucket, fps=fps,
                               clips_per_video=clips_per_video, vae="pixel", workers=3)
    return dataclasses.replace(config, vae="cogvideox", vae_config=UTILISATION_COG, vae_num_cpus=1.0,
                               decode_num_cpus=1.0, decode_concurrency=1, vae_batch_size=clips_per_video * 2)


def decoded_units(config) -> list[dict]:
    """Every unit of the run decoded in this process: the batches the VAE actor receives."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.data.precompute.run import unit_settings_hash
    from pipeline.data.precompute.stages import decode_units
    from pipeline.data.source.plan import plan_run

    shutil.rmtree(config.output, ignore_errors=True)
    plan = plan_run(config.manifest, rows_per_unit=config.rows_per_work_unit, settings_hash=unit_settings_hash(config),
                    finished=[], write_to=config.output)  # the pipeline (overwrite=True) clears it again
    out = []
    for file in plan.plan_files:
        units = pq.read_table(file)
        out += [decode_units(units.slice(i, 1), buckets=config.buckets, fps=config.fps,
                             clips_per_video=config.clips_per_video, backend=config.decode_backend)
                for i in range(units.num_rows)]
    return out


def measure_encoder_alone(config, units: list[dict]) -> Row:
    """VAEStage on the decoded units, one after the other, in this process (one torch thread)."""
    import json

    from pipeline.data.precompute.run import describe_vae
    from pipeline.data.precompute.stages import VAEStage

    fp = describe_vae(config.vae, config.vae_build_kwargs(), config.buckets)["fingerprint"]
    stage = VAEStage(kind=config.vae, build_kwargs=config.vae_build_kwargs(), fingerprint=fp,
                     batch_size=config.vae_batch_size, num_cpus=config.vae_num_cpus)
    stage(units[0])  # warm-up: allocator, oneDNN kernels

    def run() -> int:
        return sum(len(json.loads(m)["clips"]) for unit in units for m in stage(unit)["meta"])

    clips, wall, cpu = _timed(run)
    return Row(measurement=f"encoder alone: VAEStage, {config.vae_batch_size} clips/batch, 1 thread", clips=clips,
               wall_s=wall, cpu_s=cpu)


def run_utilisation(folder: Path, paths: list[Path], args, bucket: Bucket) -> list[Row]:
    """Encoder alone, the pipeline, the encoder alone again; the ratio in the pipeline row's note."""
    config = utilisation_config(folder, paths, repeats=args.repeats, bucket=bucket, fps=args.fps,
                                clips_per_video=args.clips_per_video)
    units = decoded_units(config)
    before = measure_encoder_alone(config, units)
    pipeline = measure_pipeline(config)
    after = measure_encoder_alone(config, units)
    alone = 2 / (1 / before.clips_per_s + 1 / after.clips_per_s)  # mean time per clip of the two
    pipeline.note += f"; pipeline / encoder alone = {pipeline.clips_per_s / alone:.2f} (bar >= 0.85)"
    before.note, after.note = "before the pipeline", "after the pipeline"
    return [before, pipeline, after]


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
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time the Ray pipeline against a plain loop (and the GPU ratio with CUDA)")
    parser.add_argument("--repeats", type=int, default=2, help="end to end: times the manifest lists each source")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="end to end: CPUs of the local Ray")
    parser.add_argument("--utilisation", action="store_true",
                        help="encoder utilisation on this CPU: pipeline clips/s over a CPU VAE's own clips/s")
    parser.add_argument("--vae", choices=["pixel", "cogvideox"], help="end to end: default cogvideox with CUDA")
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
        print(object_store_bytes(paths, bucket, args.fps))
        if args.end_to_end:
            print(f"# end to end: {len(paths) * args.repeats} manifest rows, Ray on {args.workers} CPUs")
            print(format_table(run_end_to_end(folder, paths, args, bucket)))
        if args.utilisation:
            print(f"# encoder utilisation: {len(paths) * args.repeats} manifest rows, 1 decode task, 1 CPU VAE "
                  f"actor (CogVideoX architecture {UTILISATION_COG['block_out_channels']}, float32), load average "
                  f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the start")
            rows = run_utilisation(folder, paths, args, bucket)
            print(format_table(rows))
            print(f"# load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
