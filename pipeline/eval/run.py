"""`run_eval`: generate the videos, score them, reduce across ranks, write eval.json, log to MLflow.

One process or several (the `deepspeed` launcher or Ray Train workers set RANK/WORLD_SIZE): rank r
generates the contiguous share [r*N/W, (r+1)*N/W) of the N videos. Video i always uses prompt i
(modulo the list) and seed seeds[i] (or seed + i), and its noise is drawn on the CPU from that seed, so
the videos do not depend on the number of processes. Every rank writes its own MP4s, scores them (CLIP
score per video, I3D feature sums) and decodes its share of the real clips when their statistics are
not cached; sums are all-reduced (float64), per-video rows gathered to rank 0, which computes FVD, writes
<out>/eval.json and logs to MLflow (pipeline/eval/log.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from pipeline.eval.config import EvalConfig, EvalError
from pipeline.eval.fvd import (
    FEATURE_DIM,
    FeatureStats,
    frechet_distance,
    i3d_features,
    load_i3d,
)
from pipeline.eval.protocol import EvalProtocol, describe_seeds, text_hash

RESULT_FILE = "eval.json"


# -- processes --------------------------------------------------------------------------------------


class _World:
    """rank, world size, device and the three collectives eval needs (no-ops on one process)."""

    def __init__(self, device: str):
        import torch.distributed as dist

        self.dist = dist
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Plain torch.distributed from the launcher's environment (deepspeed, torchrun, Ray Train):
            # evaluation needs three collectives, not DeepSpeed's engine, whose import costs seconds per rank.
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            cuda = device in ("auto", "cuda") and torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(local_rank)
            if not dist.is_initialized():  # Ray Train has made the group already
                dist.init_process_group("nccl" if cuda else "gloo")
            self.rank, self.size = dist.get_rank(), dist.get_world_size()
            self.device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        else:
            self.rank, self.size = 0, 1
            self.device = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        # NCCL reduces CUDA tensors only; gloo CPU ones.
        self.comm_device = (torch.device("cuda", torch.cuda.current_device())
                            if self.size > 1 and dist.get_backend() == "nccl" else torch.device("cpu"))

    def share(self, count: int) -> range:
        return range(self.rank * count // self.size, (self.rank + 1) * count // self.size)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return value
        total = value.to(self.comm_device).clone()
        self.dist.all_reduce(total, op=self.dist.ReduceOp.SUM)
        return total.cpu()

    def gather(self, obj) -> list:
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if self.size == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]


# -- inputs ------------------------------------------------------------------------------------------


def load_prompts(source: str, count: int) -> list[str]:
    """Prompts of a text file, or the first `count` captions of a latent data set (folder or manifest.json)."""
    from pipeline.data.store.shards import read_output_manifest, read_shard
    from pipeline.generate import SampleError, read_prompts

    path = Path(source).expanduser()
    root = path if path.is_dir() else path.parent if path.name == "manifest.json" else None
    if root is None:
        try:
            return read_prompts(path)
        except SampleError as err:
            raise EvalError(f"--prompts: {err}") from None
    manifest = read_output_manifest(root)
    if manifest is None:
        raise EvalError(f"--prompts {source}: no manifest.json in {root}; give a text file with one prompt per "
                        "line or a latent data set made by pomvid precompute")
    captions: list[str] = []
    from pipeline.data.store.index import read_index

    for file in read_index(root, columns=["file"]).column("file").to_pylist():
        captions += [c for c in read_shard(root / file, columns=["caption"]).column("caption").to_pylist() if c]
        if len(captions) >= count:
            break
    if not captions:
        raise EvalError(f"--prompts {source}: the data set holds no captions")
    return captions[:count]


# -- the run -----------------------------------------------------------------------------------------


def run_eval(config: EvalConfig) -> dict | None:
    """Evaluate; rank 0 returns the result (also written to <out>/eval.json), other ranks None."""
    from pipeline.eval.clip_score import ClipScorer
    from pipeline.generate import SampleError, SampleOptions, VideoGenerator

    world = _World(config.device)
    start = time.perf_counter()
    try:
        generator = VideoGenerator.load(config.checkpoint, device=world.device)
        options = SampleOptions(frames=config.frames, height=config.height, width=config.width, steps=config.steps,
                                guidance=config.guidance, shift=config.shift, solver=config.solver,
                                sequential=config.sequential, batch_size=config.batch_size)
        generator.latent_shape(options)  # a size the model cannot make fails before any work
    except SampleError as err:
        raise EvalError(str(err)) from None
    frames, height, width = (options.frames or generator.train_size[0], options.height or generator.train_size[1],
                             options.width or generator.train_size[2])
    fps = float(config.fps or generator.fps)
    prompts = load_prompts(config.prompts, config.num_videos)
    scorer = (ClipScorer.load(config.clip_model, model_name=config.clip_model_name, device=world.device)
              if config.clip_model else None)
    i3d = load_i3d(config.i3d, device=world.device) if config.real else None
    protocol = EvalProtocol(
        num_videos=config.num_videos, frames=frames, height=height, width=width, fps=fps,
        seeds=describe_seeds([config.seed_of(i) for i in range(config.num_videos)]), prompts=text_hash(prompts),
        num_prompts=len(prompts), steps=config.steps, guidance=config.guidance, shift=config.shift,
        solver=config.solver, sequential=config.sequential,
        clip={k: v for k, v in scorer.fingerprint().items() if k != "source"} if scorer else None)
    real = None
    if i3d is not None:
        from pipeline.eval.realstats import real_statistics

        real = real_statistics(config, world, i3d, frames=frames, height=height, width=width, fps=fps)
        protocol.fvd = {"network": real["fingerprint"]["network"], "resolution": config.fvd_resolution,
                        "real": real["fingerprint"]["clips"], "num_real": real["fingerprint"]["num_real"]}
    out = Path(config.out)
    videos_dir = out / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    gen_start = time.perf_counter()
    rows, fake = _generate_share(config, world, generator, options, prompts, scorer, i3d, videos_dir, fps)
    fake = FeatureStats.from_tensor(world.sum(fake.to_tensor()), FEATURE_DIM) if i3d is not None else None
    rows = sorted((row for part in world.gather(rows) for row in part), key=lambda r: r["index"])
    gen_seconds = time.perf_counter() - gen_start
    if world.rank != 0:
        return None
    metrics = {}
    if scorer is not None:
        metrics["clip_score"] = sum(r["clip_score"] for r in rows) / len(rows)
    if real is not None:
        metrics["fvd"] = frechet_distance(fake, real["stats"])
    result = {
        "protocol_id": protocol.id, "protocol": protocol.to_dict(), "protocol_summary": protocol.summary(),
        "metrics": metrics, "checkpoint": str(generator.checkpoint.resolve()), "step": generator.step,
        "mlflow_run_id": generator.mlflow_run_id, "run_folder": _run_folder(generator.checkpoint.resolve()),
        "world_size": world.size, "device": str(world.device),
        "real_stats": {k: v for k, v in (real or {}).items() if k != "stats"} or None,
        "seconds": {"total": time.perf_counter() - start, "generate_and_score": gen_seconds},
        "videos": rows,
    }
    (out / RESULT_FILE).write_text(json.dumps(result, indent=1))
    return result


def _run_folder(source: Path) -> str:
    """The training run folder of a checkpoint or of an export (where its embedded MLflow store lives)."""
    from pipeline.export import CONFIG_FILE, is_export

    if is_export(source):
        return (json.loads((source / CONFIG_FILE).read_text()).get("source") or {}).get("run_folder") or ""
    return str(source.parent.parent)


def _generate_share(config, world, generator, options, prompts, scorer, i3d, videos_dir: Path, fps: float):
    """Generate, write and score this rank's videos; returns (rows, fake feature sums)."""
    from dataclasses import replace

    from tqdm import tqdm

    from pipeline.generate import slug
    from pipeline.media import write_mp4

    mine = list(world.share(config.num_videos))
    fake = FeatureStats.empty()
    rows = []
    bar = tqdm(total=len(mine), unit="video", disable=not (config.progress and world.rank == 0),
               desc=f"generating (rank 0 of {world.size}, {config.num_videos} videos in all)")
    for batch in _batches(mine, config):
        first = batch[0]
        made = generator.generate([prompts[i % len(prompts)] for i in batch],
                                  replace(options, seed=config.seed_of(first)))
        videos = [m.video for m in made]  # (3, T, H, W) each, in [-1, 1]
        scores = scorer.score_videos(videos, [m.prompt for m in made]) if scorer else [None] * len(made)
        if i3d is not None:
            fake.add(i3d_features(i3d, torch.stack(videos), resolution=config.fvd_resolution))
        for index, item, score in zip(batch, made, scores):
            path = write_mp4(item.video, videos_dir / f"{index:05d}_{slug(item.prompt)}_seed{item.seed}.mp4",
                             fps=fps, scale=None)
            rows.append({"index": index, "prompt": item.prompt, "seed": item.seed, "mp4": str(path),
                         "clip_score": score})
        bar.update(len(batch))
    bar.close()
    return rows, fake


def _batches(indices: list[int], config: EvalConfig) -> list[list[int]]:
    """Runs of consecutive seeds, cut at batch_size (generate() gives prompt j the seed seed + j)."""
    out: list[list[int]] = []
    for i in indices:
        if out and len(out[-1]) < config.batch_size and config.seed_of(i) == config.seed_of(out[-1][-1]) + 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out
