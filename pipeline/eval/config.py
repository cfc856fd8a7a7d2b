"""What `pomvid eval` does: which checkpoint, which prompts and real clips, which networks, which protocol."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.generate import SOLVERS


class EvalError(ValueError):
    """A request `pomvid eval` cannot run; the message names the option or file and the fix."""


@dataclass(kw_only=True)
class EvalConfig:
    """One evaluation of one checkpoint."""

    checkpoint: str
    """A training run folder (its newest complete checkpoint), its checkpoints/ folder, one step folder,
    or an export folder."""

    prompts: str
    """A text file with one prompt per line, or a latent data set (folder with manifest.json, or the
    manifest.json itself) whose captions are used; video i takes prompt i modulo the list."""

    out: str
    """Folder for the videos (videos/*.mp4) and eval.json."""

    num_videos: int = 64
    """Videos to generate."""

    seeds: list[int] = field(default_factory=lambda: [0])
    """One seed: video i uses seed + i. Otherwise one seed per video."""

    real: str | None = None
    """Real clips for FVD: a folder of videos or a manifest (CSV/JSONL/Parquet); None: no FVD."""

    num_real: int | None = None
    """Real clips to use (the first ones); None: as many as num_videos."""

    i3d: str | None = None
    """Local file with the Kinetics-400 I3D weights (safetensors or a PyTorch state dict); needed with real."""

    fvd_resolution: int = 224
    """Frame size the I3D network sees (224 is the standard FVD protocol)."""

    real_stats: str | None = None
    """A real-statistics file to use or create; one made with another protocol is refused."""

    real_stats_dir: str | None = None
    """Cache folder for real statistics (default: $POMVID_FVD_CACHE or ~/.cache/pomvid/fvd_real_stats)."""

    clip_model: str | None = None
    """open_clip model for CLIP score: a local-dir, an hf-hub: id, or a checkpoint file (with clip_model_name)."""

    clip_model_name: str | None = None
    """open_clip architecture of a checkpoint-file clip_model (e.g. ViT-L-14)."""

    frames: int | None = None
    """Frames per video; None: the training clips'."""

    height: int | None = None
    """Height in pixels; None: the training clips'."""

    width: int | None = None
    """Width in pixels; None: the training clips'."""

    fps: float | None = None
    """Frame rate of the videos (and of the real clips); None: the data's."""

    steps: int = 30
    """Sampler steps."""

    guidance: float = 3.0
    """Classifier-free guidance scale."""

    shift: float = 1.0
    """Timestep shift of the sampler's schedule."""

    solver: str = "euler"
    """ODE solver: euler or heun."""

    sequential: bool = False
    """Frame-sequential generation (block-causal models)."""

    batch_size: int = 8
    """Videos generated (and scored) together per process."""

    device: str = "auto"
    """auto, cpu or cuda."""

    tracking: str = "auto"
    """auto: log to the training run when a store is found; on: must log; off: never."""

    tracking_uri: str | None = None
    """MLflow store; None: MLFLOW_TRACKING_URI, else the run folder's mlflow.db."""

    experiment: str = "pomvid"
    """Experiment of the run created when the checkpoint names no training run."""

    progress: bool = True
    """Show a progress bar (rank 0)."""

    def __post_init__(self):
        for name in ("num_videos", "steps", "batch_size", "fvd_resolution"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvalError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
        if self.num_videos < 2 and self.real:
            raise EvalError(f"--num-videos {self.num_videos}: FVD needs at least 2 videos")
        for name in ("frames", "height", "width", "num_real"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise EvalError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
        if self.num_real is not None and self.num_real < 2:
            raise EvalError(f"--num-real {self.num_real}: FVD needs at least 2 real clips")
        self.seeds = [int(s) for s in self.seeds]
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise EvalError(f"--seeds {self.seeds}: give one base seed or one non-negative seed per video")
        if len(self.seeds) not in (1, self.num_videos):
            raise EvalError(f"--seeds: {len(self.seeds)} seeds for {self.num_videos} videos; give one base seed "
                            "(video i uses seed + i) or exactly one per video")
        if self.real and not self.i3d:
            raise EvalError("--real needs --i3d FILE: the Kinetics-400 I3D weights FVD is computed with (a local "
                            "file; nothing is downloaded)")
        if self.i3d and not self.real:
            raise EvalError("--i3d is given without --real: FVD compares generated videos with real clips")
        if not self.real and not self.clip_model:
            raise EvalError("nothing to score: give --clip-model (CLIP score) and/or --real with --i3d (FVD)")
        if self.solver not in SOLVERS:
            raise EvalError(f"--solver {self.solver!r} is unknown; use one of {SOLVERS}")
        if not self.guidance >= 0 or not self.shift > 0 or (self.fps is not None and not self.fps > 0):
            raise EvalError(f"--cfg {self.guidance} must be >= 0, --shift {self.shift} and --fps {self.fps} > 0")
        if self.tracking not in ("auto", "on", "off"):
            raise EvalError(f"--tracking {self.tracking!r}: use auto, on or off")
        if self.device not in ("auto", "cpu", "cuda"):
            raise EvalError(f"--device {self.device!r}: use auto, cpu or cuda")

    def seed_of(self, index: int) -> int:
        return self.seeds[0] + index if len(self.seeds) == 1 else self.seeds[index]
