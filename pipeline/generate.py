"""Videos from a trained checkpoint: the library behind `pomvid sample` and the demo's sampling.

    generator = VideoGenerator.load("runs/demo")               # a run folder, checkpoints/, step_* or an export
    videos = generator.generate(["a red square moving up"], SampleOptions(seed=0))
    rows = write_samples(videos, "samples/", fps=generator.fps)  # MP4 + GIF per prompt, samples.csv

What a checkpoint needs to be sampled (pipeline/train/checkpoint.py): its COMPLETE marker, the EMA
weights (ema.safetensors), the model config in trainer_state.json, and the latents' manifest.json,
whose VAE and text-encoder fingerprints say how to rebuild both encoders. The trainer copies that
manifest into the run folder (latents_manifest.json), so sampling works after the latents are gone;
an older run falls back to the manifest in its data.path.

Prompt i starts from `initial_noise(seed + i)` (drawn on the CPU), so a seed gives the same video on
any device and whatever the batch. `sequential=True` runs a block-causal model frame by frame through
its per-layer PoM (sum, count) caches (constant memory), also for more frames than it was trained on.
"""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.train import checkpoint as ckpt

RUN_MANIFEST = "latents_manifest.json"
SOLVERS = ("euler", "heun")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CSV_COLUMNS = ("index", "prompt", "seed", "mp4", "gif", "frames", "height", "width", "steps", "guidance",
               "shift", "solver", "sequential", "checkpoint", "seconds")


class SampleError(ValueError):
    """A checkpoint or request that cannot be sampled; the message names the path or value and the fix."""


@dataclass(kw_only=True)
class SampleOptions:
    """How to sample: video size, solver, guidance, seed."""

    frames: int | None = None
    """Video frames; None: the training clips' count. Any count the VAE and the patches allow is accepted;
    a block-causal model with `sequential` is the one made to go past the training length."""

    height: int | None = None
    """Video height in pixels; None: the training clips' height."""

    width: int | None = None
    """Video width in pixels; None: the training clips' width."""

    steps: int = 20
    """ODE solver steps."""

    guidance: float = 3.0
    """Classifier-free guidance scale (1: the conditional prediction alone)."""

    shift: float = 1.0
    """Timestep shift of the schedule (SD3); > 1 spends more steps near the noise."""

    solver: str = "euler"
    """"euler" or "heun"."""

    seed: int = 0
    """Seed of the initial noise; prompt i uses seed + i."""

    sequential: bool = False
    """Generate frame by frame with the PoM state cache (block-causal models only)."""

    batch_size: int = 8
    """Prompts denoised together (the result does not depend on it beyond float rounding)."""

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SampleError(f"{name}={value!r} must be a positive integer (or left out for the training size)")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SampleError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SampleError(f"seed={self.seed!r} must be a non-negative integer")
        if not self.guidance >= 0:
            raise SampleError(f"guidance={self.guidance!r} must be >= 0 (1 = no guidance, 3-5 usual)")
        if not self.shift > 0:
            raise SampleError(f"shift={self.shift!r} must be > 0 (1 = uniform schedule)")
        if self.solver not in SOLVERS:
            raise SampleError(f"solver={self.solver!r} is unknown; use one of {SOLVERS}")


@dataclass(kw_only=True)
class GeneratedVideo:
    """One generated video and how it was made."""

    prompt: str
    """The caption it was generated from."""
    seed: int
    """Seed of its initial noise."""
    video: torch.Tensor
    """float (3, T, H, W) in [-1, 1], on the CPU."""
    seconds: float
    """Wall time of its batch divided by the batch size (sampling and decoding)."""
    options: SampleOptions
    """The options it was sampled with."""


# -- locating a checkpoint and its manifest -------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint folder `path` names: a run folder or its checkpoints/ folder (-> the newest
    complete checkpoint) or one step_XXXXXXXX folder (which must be complete)."""
    path = Path(path)
    what = ("give a training run folder (with checkpoints/), its checkpoints/ folder or one "
            "checkpoints/step_XXXXXXXX folder")
    if not path.is_dir():
        raise SampleError(f"checkpoint {path}: no such folder; {what}")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else None
    if root is None and (path.name == "checkpoints" or (path / ckpt.LATEST).is_file()):
        root = path
    if root is not None:
        found = ckpt.find_latest(root)
        if found is None:
            steps = sorted(p.name for p in root.glob("step_*"))
            detail = f" ({', '.join(steps)} have no {ckpt.COMPLETE} file: interrupted while saving)" if steps else ""
            raise SampleError(f"checkpoint {path}: no complete checkpoint in {root}{detail}; wait for the run's "
                              "first checkpoint, or resume the run (pomvid train --resume auto) to write one")
        return found
    if (path / ckpt.STATE_FILE).is_file() or (path / ckpt.DS_TAG).is_dir() or path.name.startswith("step_"):
        if not ckpt.is_complete(path):
            raise SampleError(f"checkpoint {path} is incomplete (no {ckpt.COMPLETE} file: the run was interrupted "
                              f"while saving it); pass the run folder {path.parent.parent} to use the newest "
                              "complete checkpoint")
        return path
    raise SampleError(f"checkpoint {path}: not a checkpoint folder (no checkpoints/, {ckpt.LATEST} or "
                      f"{ckpt.STATE_FILE}); {what}")


def find_manifest(checkpoint: Path, state: dict) -> tuple[dict, Path]:
    """The latents' manifest of a checkpoint: the run folder's copy, else the one in data.path."""
    candidates = [checkpoint.parent.parent / RUN_MANIFEST]
    data_path = ((state.get("config") or {}).get("data") or {}).get("path")
    if data_path:
        candidates.append(Path(data_path) / "manifest.json")
    for candidate in candidates:
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text()), candidate
            except ValueError as err:
                raise SampleError(f"{candidate}: not valid JSON ({err}); restore it from the latents folder") from None
    raise SampleError(
        f"checkpoint {checkpoint}: cannot find the latents' manifest (looked for "
        f"{' and '.join(str(c) for c in candidates)}); it records the VAE and text encoder to sample with. "
        f"Copy the precompute output's manifest.json to {candidates[0]}"
    )


def _check_dims(model_config, manifest: dict, manifest_path: Path) -> None:
    channels = (manifest.get("latent") or {}).get("channels")
    text_dim = (manifest.get("text") or {}).get("dim")
    if channels is not None and int(channels) != model_config.in_channels:
        raise SampleError(f"model/encoder mismatch: the checkpoint's model takes {model_config.in_channels} latent "
                          f"channels but the VAE in {manifest_path} makes {channels}; use the manifest of the "
                          "latents this model was trained on")
    if text_dim is not None and int(text_dim) != model_config.text_dim:
        raise SampleError(f"model/encoder mismatch: the checkpoint's model takes {model_config.text_dim}-wide text "
                          f"embeddings but the text encoder in {manifest_path} makes {text_dim}; use the manifest "
                          "of the latents this model was trained on")


def _device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"device {device}: no CUDA GPU is visible here; use --device cpu")
    return device


# -- the generator --------------------------------------------------------------------------------------


class VideoGenerator:
    """A checkpoint's EMA model with the VAE and text encoder its latents were made with."""

    def __init__(self, *, model, vae, text_encoder, checkpoint: Path, step: int, manifest: dict,
                 manifest_path: Path, device: torch.device, mlflow_run_id: str | None):
        self.model, self.vae, self.text_encoder = model, vae, text_encoder
        self.checkpoint, self.step, self.device = checkpoint, step, device
        self.manifest, self.manifest_path, self.mlflow_run_id = manifest, manifest_path, mlflow_run_id
        bucket = manifest["buckets"][0]
        self.train_size = (int(bucket["frames"]), int(bucket["height"]), int(bucket["width"]))
        self.fps = float((manifest.get("settings") or {}).get("fps", 8.0))
        emb, mask = text_encoder.encode([""])
        self.null_text, self.null_mask = emb[0][mask[0]], torch.ones(int(mask[0].sum()), dtype=torch.bool,
                                                                     device=emb.device)

    @classmethod
    def load(cls, checkpoint: str | Path, *, device: str | torch.device | None = None,
             dtype: str = "float32") -> VideoGenerator:
        """A run folder, its checkpoints/ folder, one step folder, or an export folder (pipeline/export.py).
        `dtype`: the model's while sampling, "float32" or "bfloat16" (the GPU recipes' training dtype, half
        the weights' memory; the VAE decodes in float32 either way)."""
        from pipeline.export import is_export

        if dtype not in DTYPES:
            raise SampleError(f"dtype={dtype!r} is unknown; use one of {tuple(DTYPES)}")
        generator = cls._load_export(checkpoint, device=device) if is_export(checkpoint) else cls._load_run(
            checkpoint, device=device)
        generator.model.to(DTYPES[dtype])
        return generator

    @classmethod
    def _load_run(cls, checkpoint: str | Path, *, device) -> VideoGenerator:
        folder = resolve_checkpoint(checkpoint)
        state = ckpt.read_state(folder)
        manifest, manifest_path = find_manifest(folder, state)
        ema = ckpt.load_ema(folder)
        if ema is None:
            raise SampleError(f"checkpoint {folder} has no {ckpt.EMA_FILE} (the EMA weights sampling uses); "
                              "pick another checkpoint of the run")
        return cls._build(model=state.get("config", {}).get("model"), weights=ema, manifest=manifest,
                          manifest_path=manifest_path, source=folder, step=int(state["step"]),
                          mlflow_run_id=state.get("mlflow_run_id"), config_file=folder / ckpt.STATE_FILE,
                          weights_file=folder / ckpt.EMA_FILE, device=device)

    @classmethod
    def _load_export(cls, folder: str | Path, *, device) -> VideoGenerator:
        from pipeline.export import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, ExportError, read_export

        try:
            export = read_export(folder)
        except ExportError as err:
            raise SampleError(str(err)) from None
        return cls._build(model=export.model, weights=export.weights, manifest=export.manifest,
                          manifest_path=export.folder / MANIFEST_FILE, source=export.folder, step=export.step,
                          mlflow_run_id=export.source.get("mlflow_run_id"),
                          config_file=export.folder / CONFIG_FILE, weights_file=export.folder / WEIGHTS_FILE,
                          device=device)

    @classmethod
    def _build(cls, *, model, weights: dict, manifest: dict, manifest_path: Path, source: Path, step: int,
               mlflow_run_id: str | None, config_file: Path, weights_file: Path, device) -> VideoGenerator:
        from pipeline.data.encode.text_factory import text_encoder_from_fingerprint
        from pipeline.data.encode.vae_factory import vae_from_fingerprint
        from pipeline.models.configs import DiTConfig
        from pipeline.models.dit import PoMDiT

        device = _device(device)
        try:
            model_config = DiTConfig(**model)
        except (KeyError, TypeError, ValueError) as err:
            raise SampleError(f"{config_file}: no usable model config ({err}); was it written by "
                              "`pomvid train` or `pomvid export`?") from None
        _check_dims(model_config, manifest, manifest_path)
        model = PoMDiT(model_config)
        params = dict(model.named_parameters())
        missing = [k for k in params if k not in weights]
        wrong = [k for k, v in weights.items() if k not in params or tuple(v.shape) != tuple(params[k].shape)]
        if missing or wrong:
            raise SampleError(f"{weights_file} does not fit the model in {config_file} "
                              f"(missing {missing[:3]}, unexpected or misshapen {wrong[:3]}); the files come from "
                              "different runs")
        model.load_state_dict(weights, strict=False)  # buffers (none persistent today) keep their init
        model.to(device).eval().requires_grad_(False)
        vae = _rebuild("VAE", vae_from_fingerprint, manifest.get("vae"), manifest_path, device)
        text_encoder = _rebuild("text encoder", text_encoder_from_fingerprint, manifest.get("text_encoder"),
                                manifest_path, device)
        if vae.latent_channels != model_config.in_channels or text_encoder.dim != model_config.text_dim:
            raise SampleError(f"model/encoder mismatch: the model takes {model_config.in_channels} latent channels "
                              f"and {model_config.text_dim}-wide text, the encoders of {manifest_path} make "
                              f"{vae.latent_channels} and {text_encoder.dim}")
        return cls(model=model, vae=vae, text_encoder=text_encoder, checkpoint=Path(source), step=step,
                   manifest=manifest, manifest_path=manifest_path, device=device, mlflow_run_id=mlflow_run_id)

    def latent_shape(self, options: SampleOptions) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the latents for the requested video size; SampleError when it cannot be made."""
        frames = options.frames or self.train_size[0]
        height = options.height or self.train_size[1]
        width = options.width or self.train_size[2]
        cfg = self.model.config
        try:
            shape = self.vae.latent_shape(frames, height, width)
            reason = None
        except ValueError as err:
            shape, reason = None, str(err)
        if shape is not None and (shape[1] % cfg.patch_t or shape[2] % cfg.patch_size or shape[3] % cfg.patch_size):
            reason = (f"its latents ({shape[1]} frames of {shape[2]}x{shape[3]}) do not split into the model's "
                      f"patches (patch_t={cfg.patch_t}, patch_size={cfg.patch_size})")
        if reason is not None:
            step = self.vae.spatial_compression * cfg.patch_size
            raise SampleError(
                f"cannot make {frames} frames of {height}x{width}: {reason}. This model makes heights and widths "
                f"that are multiples of {step} (VAE x{self.vae.spatial_compression} times patch {cfg.patch_size}); "
                f"it was trained on {self.train_size[0]} frames of {self.train_size[1]}x{self.train_size[2]}"
            )
        return shape

    @torch.no_grad()
    def generate(self, prompts: list[str], options: SampleOptions, *, dims=None) -> list[GeneratedVideo]:
        """One video per prompt; prompt i starts from the noise of seed options.seed + i.

        `dims` (a ParallelDims with dp=1, every rank calling): sample each video across its SP group with
        the frames sharded (pipeline/parallel/sampling.py; a block-causal model frame by frame, the PoM
        caches handed from rank to rank, with or without `sequential`); rank 0 decodes and gets the
        videos, the other ranks an empty list."""
        from pipeline.models.sampler import SamplerConfig, initial_noise, sample, sample_sequential
        from pipeline.parallel.parallelize import comm_counter, parallelize_pom_dit
        from pipeline.parallel.sampling import sample_sequence_parallel

        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise SampleError(f"prompts={prompts!r:.120}: give a list of non-empty captions")
        if options.sequential and not self.model.config.causal:
            raise SampleError(f"--sequential needs a block-causal model (model.causal=true), and the model of "
                              f"{self.checkpoint} is bidirectional; sample it without --sequential")
        sharded = dims is not None and dims.sp > 1
        dtype = next(self.model.parameters()).dtype  # VideoGenerator.load's dtype
        if sharded and comm_counter(self.model) is None:
            parallelize_pom_dit(self.model, dims)
        shape = self.latent_shape(options)
        sampler = SamplerConfig(steps=options.steps, guidance=options.guidance, shift=options.shift,
                                solver=options.solver)
        guided = options.guidance != 1.0
        null = dict(null_text=self.null_text.to(dtype), null_mask=self.null_mask) if guided else {}
        out: list[GeneratedVideo] = []
        for first in range(0, len(prompts), options.batch_size):
            batch = prompts[first:first + options.batch_size]
            start = time.perf_counter()
            text, mask = self.text_encoder.encode(batch)  # (B, L, D), (B, L)
            noise = torch.cat([initial_noise((1, *shape), options.seed + first + i, device=self.device)
                               for i in range(len(batch))]).to(dtype)  # (B, C, T, H, W)
            text = text.to(dtype)
            if sharded:
                latents = sample_sequence_parallel(self.model, noise, text.to(self.device), mask.to(self.device),
                                                   dims=dims, config=sampler, **null)
                if dims.rank != 0:
                    continue  # the same latents on every rank: rank 0 decodes
            else:
                run = sample_sequential if options.sequential else sample
                latents = run(self.model, noise, text.to(self.device), mask.to(self.device), config=sampler, **null)
            videos = self.vae.decode(latents.float()).float().clamp(-1, 1).cpu()  # (B, 3, T, H, W)
            seconds = (time.perf_counter() - start) / len(batch)
            for i, prompt in enumerate(batch):
                out.append(GeneratedVideo(prompt=prompt, seed=options.seed + first + i, video=videos[i],
                                          seconds=seconds, options=options))
        return out


def _rebuild(what: str, build, fingerprint: dict | None, manifest_path: Path, device):
    if not fingerprint:
        raise SampleError(f"{manifest_path} records no {what}; sampling needs the {what} the latents were made with")
    try:
        return build(fingerprint, device=device)
    except (OSError, ValueError, KeyError) as err:
        raise SampleError(f"the {what} recorded in {manifest_path} cannot be rebuilt: {err}. Make its files "
                          f"available at {fingerprint.get('source') or 'the recorded source'}") from None


# -- writing --------------------------------------------------------------------------------------------


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def write_samples(videos: list[GeneratedVideo], out_dir: str | Path, *, fps: float, scale: int | None = None,
                  checkpoint: str | Path = "") -> list[dict]:
    """Write `<index>_<slug>_seed<seed>.mp4` and `.gif` per video and samples.csv into `out_dir`.

    scale: integer pixel-repeat factor; None: a viewing size. Returns the rows of samples.csv.
    """
    from pipeline.media import write_video_and_preview

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, item in enumerate(videos):
        stem = out / f"{index:03d}_{slug(item.prompt)}_seed{item.seed}"
        mp4, gif = write_video_and_preview(item.video, stem, fps=fps, scale=scale)
        o = item.options
        rows.append({"index": index, "prompt": item.prompt, "seed": item.seed, "mp4": str(mp4), "gif": str(gif),
                     "frames": item.video.shape[1], "height": item.video.shape[2], "width": item.video.shape[3],
                     "steps": o.steps, "guidance": o.guidance, "shift": o.shift, "solver": o.solver,
                     "sequential": o.sequential, "checkpoint": str(checkpoint), "seconds": round(item.seconds, 4)})
    with open(out / "samples.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file, one per line (blank lines and lines starting with # are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"prompts file {path}: no such file; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SampleError(f"prompts file {path} holds no prompt; write one prompt per line")
    return prompts
