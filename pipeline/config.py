"""The run configuration of `pomvid train`: typed, keyword-only dataclasses and named recipes.

A run is one `RunConfig`, composed of the parts' configs (the model's `DiTConfig` from
pipeline/models/configs.py and the training sections below). Recipes are plain functions returning a
full `RunConfig` (`debug` on a CPU, `S`, `B`, `XL` on GPUs); the command line picks one with
`--recipe NAME` and changes fields with `--set section.field=value` (pipeline/config_overrides.py).

Every section validates itself in `__post_init__`; checks that need the world size (dp * sp must be
the number of processes, batch sizes must divide) are in `RunConfig.layout(world_size)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.models.configs import DiTConfig, dit_config

PRECISIONS = ("auto", "bf16", "fp32")
LR_DECAYS = ("cosine", "constant")
SOLVERS = ("euler", "heun")


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the field, the value and the fix."""


def _positive_int(owner: str, name: str, value: Any, *, zero_ok: bool = False) -> None:
    low = 0 if zero_ok else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        what = "a non-negative integer" if zero_ok else "a positive integer"
        raise ConfigError(f"{owner}.{name}={value!r} must be {what}")


def _in_range(owner: str, name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{owner}.{name}={value!r} must be a number in [{low}, {high}{bracket}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the latents come from and how many samples make a step."""

    path: str = ""
    """Folder written by `pomvid precompute` (manifest.json + shards/). Required to train (`--data`)."""

    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel groups (the SP ranks of a group share samples).
    Must equal micro_batch_size x gradient-accumulation steps x dp; keep it when resuming with another dp."""

    micro_batch_size: int = 1
    """Samples in one forward/backward on one data-parallel group; gradient accumulation makes up the rest."""

    seed: int = 0
    """Seed of the loader's shuffling (per epoch and bucket)."""

    drop_last: bool = True
    """Drop each bucket's last incomplete global batch (False: fill it by wrapping around the bucket)."""

    def __post_init__(self):
        if not isinstance(self.path, str):
            raise ConfigError(f"DataConfig.path={self.path!r} must be a folder path (str)")
        _positive_int("DataConfig", "global_batch_size", self.global_batch_size)
        _positive_int("DataConfig", "micro_batch_size", self.micro_batch_size)
        _positive_int("DataConfig", "seed", self.seed, zero_ok=True)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"DataConfig.global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}; choose sizes that divide"
            )


@dataclass(kw_only=True)
class ParallelConfig:
    """The dp x sp layout of the processes (pipeline/parallel/dims.py)."""

    sp: int = 1
    """Sequence-parallel degree: ranks that share one sample, each holding a slice of its frames."""

    dp: int = 0
    """Data-parallel degree (number of SP groups). 0: world size // sp. dp x sp must be the world size."""

    def __post_init__(self):
        _positive_int("ParallelConfig", "sp", self.sp)
        _positive_int("ParallelConfig", "dp", self.dp, zero_ok=True)


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warmup, then cosine decay or constant)."""

    lr: float = 1e-4
    """Peak learning rate, reached at the end of the warmup."""

    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's (beta1, beta2)."""

    eps: float = 1e-8
    """AdamW's epsilon."""

    weight_decay: float = 0.0
    """Decoupled weight decay."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    warmup_steps: int = 1000
    """Optimizer steps of linear warmup from lr / warmup_steps to lr (0: start at lr)."""

    decay: str = "cosine"
    """After the warmup: "cosine" (down to min_lr_ratio x lr at the last step) or "constant"."""

    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of lr."""

    def __post_init__(self):
        _in_range("OptimConfig", "lr", self.lr, 0.0, 1.0)
        if len(tuple(self.betas)) != 2:
            raise ConfigError(f"OptimConfig.betas={self.betas!r} must be two numbers (beta1, beta2)")
        self.betas = tuple(float(b) for b in self.betas)
        for beta in self.betas:
            _in_range("OptimConfig", "betas", beta, 0.0, 1.0, high_open=True)
        _in_range("OptimConfig", "eps", self.eps, 0.0, 1.0)
        _in_range("OptimConfig", "weight_decay", self.weight_decay, 0.0, 1.0)
        _in_range("OptimConfig", "grad_clip", self.grad_clip, 0.0, float("inf"))
        _positive_int("OptimConfig", "warmup_steps", self.warmup_steps, zero_ok=True)
        if self.decay not in LR_DECAYS:
            raise ConfigError(f"OptimConfig.decay={self.decay!r} is unknown; use one of {LR_DECAYS}")
        _in_range("OptimConfig", "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)


GRAD_DTYPES = ("float32", "bfloat16")


@dataclass(kw_only=True)
class EngineConfig:
    """DeepSpeed: ZeRO stage, offload, precision; the JSON is built in pipeline/train/deepspeed_config.py."""

    zero_stage: int = 2
    """ZeRO stage 1 (optimizer states sharded), 2 (+ gradients) or 3 (+ parameters)."""

    offload_optimizer: bool = False
    """Keep the optimizer states in CPU memory (ZeRO-Offload, DeepSpeed's CPU Adam)."""

    precision: str = "auto"
    """"bf16" (GPU), "fp32", or "auto": bf16 on a GPU, fp32 on the CPU."""

    activation_checkpointing: bool = False
    """Recompute each DiT block in backward instead of keeping its activations."""

    grad_dtype: str = "float32"
    """Dtype gradients are reduced across ranks and accumulated over micro-batches in ("float32" or
    "bfloat16"): DeepSpeed's `communication_data_type` and `data_types.grad_accum_dtype`. float32 costs
    twice the bytes of the gradient reduction of a bf16 run but no rounding in the sum of 16 micro-batches
    x 64 ranks; fp32 runs always use float32."""

    def __post_init__(self):
        if self.zero_stage not in (1, 2, 3) or isinstance(self.zero_stage, bool):
            raise ConfigError(f"EngineConfig.zero_stage={self.zero_stage!r} must be 1, 2 or 3")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"EngineConfig.precision={self.precision!r} is unknown; use one of {PRECISIONS}")
        if self.grad_dtype not in GRAD_DTYPES:
            raise ConfigError(f"EngineConfig.grad_dtype={self.grad_dtype!r} is unknown; use one of {GRAD_DTYPES}")
        for name in ("offload_optimizer", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"EngineConfig.{name}={getattr(self, name)!r} must be true or false")


@dataclass(kw_only=True)
class FlowConfig:
    """Rectified-flow training inputs (pipeline/models/flow.py)."""

    logit_mean: float = 0.0
    """Mean of the logit-normal timestep distribution."""

    logit_std: float = 1.0
    """Standard deviation of the logit-normal timestep distribution."""

    per_frame_timesteps: bool = False
    """One timestep per token-frame (block-causal / frame-sequential models) instead of one per sample."""

    clean_prefix_prob: float = 0.0
    """Probability that a sample's first token-frames get t = 0 (needs per_frame_timesteps)."""

    caption_dropout: float = 0.1
    """Probability of replacing a caption by the null caption (for classifier-free guidance)."""

    loss_on_clean_frames: bool = False
    """Count token-frames at t = 0 (clean prefix) in the loss; False leaves them out."""

    causal_per_sample_timesteps: bool = False
    """Allow a block-causal model (model.causal=true) to train with one timestep per video. Off by default:
    frame-sequential sampling denoises a frame next to clean earlier frames, which such a model never saw
    in training; per_frame_timesteps=true (diffusion forcing) trains exactly that case."""

    def __post_init__(self):
        if not self.logit_std > 0:
            raise ConfigError(f"FlowConfig.logit_std={self.logit_std!r} must be > 0")
        _in_range("FlowConfig", "clean_prefix_prob", self.clean_prefix_prob, 0.0, 1.0)
        _in_range("FlowConfig", "caption_dropout", self.caption_dropout, 0.0, 1.0)
        if self.clean_prefix_prob > 0 and not self.per_frame_timesteps:
            raise ConfigError(
                f"FlowConfig.clean_prefix_prob={self.clean_prefix_prob} needs per_frame_timesteps=true"
            )


@dataclass(kw_only=True)
class TrainConfig:
    """The loop: length, logging, checkpoints, EMA, fault handling."""

    steps: int = 1000
    """Optimizer steps of the whole run (the learning-rate schedule ends here)."""

    stop_at: int = 0
    """Stop (with a checkpoint) after this step although the schedule runs to `steps`, e.g. to fit a job's
    time limit; `--resume auto` continues. 0: run to `steps`."""

    seed: int = 0
    """Seed of the model's initial weights and of the noise, timesteps and caption dropout of each sample."""

    output_dir: str = "runs/pomvid"
    """Folder of this run: checkpoints/, samples/, the resolved config."""

    log_every: int = 10
    """Log loss, grad norm, learning rate, throughput and memory every this many steps."""

    checkpoint_every: int = 1000
    """Save a checkpoint every this many steps (and always at the end); 0: only at the end."""

    keep_checkpoints: int = 3
    """Keep the newest this many complete checkpoints (0: keep all), in the output folder and the mirror."""

    checkpoint_mirror: str = ""
    """Object-storage prefix (s3://BUCKET/PREFIX; gs://, abfs:// too) that every complete checkpoint is copied
    to, in the background while training goes on. Needed when nodes do not share the output folder: each
    node then writes its part locally, and `--resume auto` on fresh nodes (empty output folders) restores
    the newest complete checkpoint from here. Credentials and endpoint come from the standard environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...). Empty: no mirror."""

    ema_decay: float = 0.9999
    """Decay of the exponential moving average of the weights (0 disables the EMA)."""

    max_nonfinite_steps: int = 5
    """A step with a non-finite loss is skipped; this many in a row stop the run (with a checkpoint)."""

    peak_tflops: float = 0.0
    """Peak TFLOP/s of one accelerator for MFU; 0: measure a bf16 matmul at start (GPU only)."""

    init_from: str = ""
    """Start from these weights instead of a random init: a run / checkpoint folder (its EMA, else its
    model weights), an export folder or a .safetensors file (pipeline/train/init_from.py). Other frames or
    resolution are fine; other tensor shapes are an error. Ignored when the run resumes. "": random init."""

    def __post_init__(self):
        _positive_int("TrainConfig", "steps", self.steps)
        for name in ("stop_at", "seed", "checkpoint_every", "keep_checkpoints"):
            _positive_int("TrainConfig", name, getattr(self, name), zero_ok=True)
        _positive_int("TrainConfig", "log_every", self.log_every)
        _positive_int("TrainConfig", "max_nonfinite_steps", self.max_nonfinite_steps)
        _in_range("TrainConfig", "ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        _in_range("TrainConfig", "peak_tflops", self.peak_tflops, 0.0, float("inf"))
        if not self.output_dir:
            raise ConfigError("TrainConfig.output_dir is empty; give a folder for checkpoints (--output-dir)")
        if self.checkpoint_mirror and "://" not in self.checkpoint_mirror:
            raise ConfigError(f"TrainConfig.checkpoint_mirror={self.checkpoint_mirror!r} is not a URI; give an "
                              "object-storage prefix such as s3://BUCKET/runs/NAME (file:///PATH for a mounted folder)")


@dataclass(kw_only=True)
class ValidationConfig:
    """Videos sampled with the EMA weights every `every` steps and logged to MLflow."""

    every: int = 0
    """Sample every this many steps (and at the end of the run); 0 disables validation."""

    prompts: list[str] = field(default_factory=list)
    """Captions to sample; they need the text encoder named in the latents' manifest. Empty: use the
    captions (and stored embeddings) of the first `num_samples` samples of the data set."""

    num_samples: int = 2
    """Data-set samples to take the captions from when `prompts` is empty."""

    steps: int = 25
    """Sampler steps."""

    guidance: float = 4.0
    """Classifier-free guidance scale (1: no guidance)."""

    shift: float = 1.0
    """Timestep shift of the sampler's schedule."""

    solver: str = "euler"
    """"euler" or "heun"."""

    seed: int = 0
    """Seed of the initial noise (prompt i uses seed + i), so every validation starts from the same noise."""

    fps: float = 8.0
    """Frame rate of the written videos."""

    clip_model: str = ""
    """open_clip model (local-dir, hf-hub: id, or a checkpoint file with clip_model_name) for the CLIP score
    of the validation videos, logged as `validation/clip_score`; empty: no score. FVD is `pomvid eval`'s."""

    clip_model_name: str = ""
    """open_clip architecture of a checkpoint-file clip_model (e.g. ViT-L-14)."""

    def __post_init__(self):
        _positive_int("ValidationConfig", "every", self.every, zero_ok=True)
        if isinstance(self.prompts, str) or not all(isinstance(p, str) and p for p in self.prompts):
            raise ConfigError(f"ValidationConfig.prompts={self.prompts!r} must be a list of non-empty captions")
        self.prompts = list(self.prompts)
        _positive_int("ValidationConfig", "num_samples", self.num_samples)
        _positive_int("ValidationConfig", "steps", self.steps)
        _positive_int("ValidationConfig", "seed", self.seed, zero_ok=True)
        _in_range("ValidationConfig", "guidance", self.guidance, 0.0, float("inf"))
        if not self.shift > 0 or not self.fps > 0:
            raise ConfigError(f"ValidationConfig.shift={self.shift!r} and fps={self.fps!r} must be > 0")
        if self.solver not in SOLVERS:
            raise ConfigError(f"ValidationConfig.solver={self.solver!r} is unknown; use one of {SOLVERS}")
        local = self.clip_model.startswith(("/", ".", "~"))
        if local and not os.path.exists(os.path.expanduser(self.clip_model)):
            raise ConfigError(f"ValidationConfig.clip_model={self.clip_model!r}: no such file or folder; give an "
                              "open_clip local-dir, an hf-hub: id, or leave it empty for no CLIP score")


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The run's process layout and batch split, from `RunConfig.layout(world_size)`."""

    world_size: int
    dp: int
    sp: int
    micro_batch_size: int
    grad_accum: int
    """Micro-batches per optimizer step on each data-parallel group."""

    @property
    def per_rank_batch(self) -> int:
        """Samples one DP group reads per optimizer step (micro_batch_size x grad_accum)."""
        return self.micro_batch_size * self.grad_accum

    @property
    def global_batch_size(self) -> int:
        return self.per_rank_batch * self.dp


@dataclass(kw_only=True)
class RunConfig:
    """Everything a training run needs; recipes return one, `--set` changes it."""

    recipe: str = "custom"
    """Name of the recipe this config came from (run names, MLflow)."""

    model: DiTConfig = field(default_factory=DiTConfig)
    """The PoM DiT (pipeline/models/configs.py)."""

    infer_data_dims: bool = True
    """Take model.in_channels and model.text_dim from the latent data set instead of the recipe."""

    data: DataConfig = field(default_factory=DataConfig)
    """Latent data set and batch sizes."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """dp x sp."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    """DeepSpeed ZeRO, precision, activation checkpointing."""

    flow: FlowConfig = field(default_factory=FlowConfig)
    """Flow-matching inputs and loss."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop length, logging, checkpoints, EMA."""

    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Sampled videos during training."""

    def __post_init__(self):
        sections = {"model": DiTConfig, "data": DataConfig, "parallel": ParallelConfig, "optim": OptimConfig,
                    "engine": EngineConfig, "flow": FlowConfig, "train": TrainConfig,
                    "validation": ValidationConfig}
        for name, cls in sections.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"RunConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.train.stop_at > self.train.steps:
            raise ConfigError(f"TrainConfig.stop_at={self.train.stop_at} is past steps={self.train.steps}")

    def check_training(self) -> None:
        """Checks across sections that only training needs (after every --set, so their order does not matter)."""
        if self.model.causal and not (self.flow.per_frame_timesteps or self.flow.causal_per_sample_timesteps):
            raise ConfigError(
                "model.causal=true trains a frame-sequential model, which samples each frame next to clean earlier "
                "frames: set flow.per_frame_timesteps=true (one timestep per latent frame, diffusion forcing; "
                "flow.clean_prefix_prob adds clean prefixes), or flow.causal_per_sample_timesteps=true to train "
                "with one timestep per video anyway")

    def layout(self, world_size: int) -> Layout:
        """dp, sp and gradient accumulation for `world_size` processes; ConfigError if they do not fit."""
        sp = self.parallel.sp
        if world_size % sp:
            raise ConfigError(
                f"ParallelConfig.sp={sp} does not divide the world size {world_size} (processes); "
                f"launch a multiple of {sp} processes or change parallel.sp"
            )
        dp = self.parallel.dp or world_size // sp
        if dp * sp != world_size:
            raise ConfigError(
                f"ParallelConfig: dp={dp} x sp={sp} = {dp * sp} does not match the world size {world_size}; "
                f"set parallel.dp={world_size // sp} (or 0 to derive it) or launch {dp * sp} processes"
            )
        micro, total = self.data.micro_batch_size, self.data.global_batch_size
        if total % (micro * dp):
            raise ConfigError(
                f"DataConfig.global_batch_size={total} is not a multiple of micro_batch_size={micro} x dp={dp} "
                f"= {micro * dp}; choose a global batch divisible by {micro * dp} or another micro batch"
            )
        return Layout(world_size=world_size, dp=dp, sp=sp, micro_batch_size=micro, grad_accum=total // (micro * dp))


# -- recipes ------------------------------------------------------------------------------------------


def debug() -> RunConfig:
    """A tiny model for CPUs and tests: seconds per step on 2 cores, fp32, ZeRO-2."""
    return RunConfig(
        recipe="debug",
        model=DiTConfig(width=32, depth=2, patch_size=2, degree=2, expand=2, text_dim=8, in_channels=4,
                        mlp_ratio=2.0, freq_dim=32),
        data=DataConfig(global_batch_size=4, micro_batch_size=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.01),
        engine=EngineConfig(zero_stage=2, precision="fp32"),
        train=TrainConfig(steps=20, log_every=1, checkpoint_every=10, keep_checkpoints=2, ema_decay=0.9,
                          output_dir="runs/debug"),
        validation=ValidationConfig(every=10, num_samples=2, steps=4, guidance=2.0),
    )


def _gpu_recipe(name: str, size: str, *, micro: int, checkpointing: bool) -> RunConfig:
    # CogVideoX latents (16 channels) and T5-XXL captions (4096); the data set's own dims win
    # (infer_data_dims) so a recipe also trains on other encoders' latents.
    return RunConfig(
        recipe=name,
        model=dit_config(size, in_channels=16, text_dim=4096, patch_size=2, patch_t=1, compile=True),
        data=DataConfig(global_batch_size=256, micro_batch_size=micro),
        optim=OptimConfig(lr=1e-4, warmup_steps=1000, weight_decay=0.0, min_lr_ratio=0.1),
        engine=EngineConfig(zero_stage=2, precision="bf16", activation_checkpointing=checkpointing),
        train=TrainConfig(steps=200_000, log_every=20, checkpoint_every=2000, keep_checkpoints=3,
                          ema_decay=0.9999, output_dir=f"runs/pomvid-{name}"),
        validation=ValidationConfig(every=5000, num_samples=4, steps=30, guidance=5.0, shift=3.0),
    )


def S() -> RunConfig:  # noqa: N802 (recipe names follow the model sizes)
    """PoM DiT-S (75M parameters with its 16-channel latents and 4096-wide captions) on GPUs: bf16, ZeRO-2,
    global batch 256."""
    return _gpu_recipe("S", "S", micro=16, checkpointing=False)


def B() -> RunConfig:  # noqa: N802
    """PoM DiT-B (296M parameters with its 16-channel latents and 4096-wide captions) on GPUs: bf16, ZeRO-2,
    global batch 256."""
    return _gpu_recipe("B", "B", micro=8, checkpointing=False)


def XL() -> RunConfig:  # noqa: N802
    """PoM DiT-XL (1535M parameters with its 16-channel latents and 4096-wide captions) on GPUs: bf16, ZeRO-2,
    activation checkpointing, global batch 256."""
    return _gpu_recipe("XL", "XL", micro=4, checkpointing=True)


def demo() -> RunConfig:
    """`pomvid demo`: a 0.7M-parameter PoM DiT on 16x16 moving shapes (pixel codec latents, tiny text
    encoder), two CPU processes with sp=2, fp32, ZeRO-2. The demo sets its measured values with --set."""
    return RunConfig(
        recipe="demo",
        model=DiTConfig(width=64, depth=4, patch_size=2, in_channels=12, text_dim=32),
        data=DataConfig(global_batch_size=16, micro_batch_size=16),
        parallel=ParallelConfig(sp=2),
        optim=OptimConfig(lr=2e-3, warmup_steps=100, decay="constant"),
        engine=EngineConfig(zero_stage=2, precision="fp32"),
        flow=FlowConfig(caption_dropout=0.1),
        train=TrainConfig(steps=3000, log_every=50, checkpoint_every=500, keep_checkpoints=1, ema_decay=0.99,
                          output_dir="outputs/demo/run"),
        validation=ValidationConfig(every=0),
    )


RECIPES = {"debug": debug, "S": S, "B": B, "XL": XL, "demo": demo}


def get_recipe(name: str) -> RunConfig:
    """The full config of recipe `name`; ConfigError listing the recipes when it is unknown."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]()
