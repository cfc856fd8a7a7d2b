"""The settings of one `pomvid demo` run: data, encoders, model, training and sampling, in one place.

`demo_settings(quick)` gives the full demo (the target: caption adherence >= 0.8 on held-out captions
within 15 minutes on a 2-core CPU) or the `--quick` smoke run (CI, under 3 minutes; proves the pipeline
end to end, its score means nothing). The values of the full demo come from pipeline/demo/recipe.py
when that module exists (experiments of the demo's recipe), else from the defaults below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

TEXT_KINDS = ("clip", "t5")


@dataclass(kw_only=True)
class DemoSettings:
    """Everything that decides what the demo makes; a folder made with other settings is made again."""

    size: int = 16
    """Frame height and width in pixels."""
    frames: int = 8
    """Frames per video."""
    fps: float = 8.0
    """Frame rate of the videos and of the precompute's sampling."""
    train_videos: int = 512
    """Training videos to write (captions cycle through the training combinations)."""
    shapes: tuple[str, ...] = ("square", "circle")
    """Shapes of the data set (pipeline/demo/shapes.py SHAPES)."""
    held_out: int = 4
    """Colour/direction pairs held out of training; their captions are what the demo samples and scores."""
    vae_spatial: int = 2
    """Pixel codec's spatial factor: latents have 3 * spatial^2 channels at size / spatial pixels."""
    text_encoder: str = "t5"
    """Tiny random-weight text encoder saved under <out>/encoders/: "t5" (sentencepiece trained on the training
    captions) or "clip" (open_clip). In the recipe experiments the bidirectional T5 let direction compose with
    colour on held-out pairs (0.84 adherence) where the causal CLIP tower did not (0.22)."""
    text_dim: int = 32
    """Width of the text encoder."""
    text_len: int = 32
    """Token length of the text encoder; every caption must fit (the tiny T5 tokenizes by characters: about
    27 tokens per caption). The demo checks it: a cut caption loses its direction word."""
    width: int = 64
    """DiT width."""
    depth: int = 4
    """DiT blocks."""
    patch: int = 2
    """DiT spatial patch."""
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    warmup: int = 100
    """Linear warmup steps."""
    lr_decay: str = "constant"
    """After the warmup: "constant" or "cosine"."""
    batch: int = 16
    """Global batch size."""
    steps: int = 3000
    """Optimizer steps."""
    ema_decay: float = 0.99
    """EMA decay of the weights that are sampled."""
    caption_dropout: float = 0.1
    """Probability of training on the null caption (for classifier-free guidance)."""
    logit_mean: float = 0.0
    """Mean of the logit-normal training timesteps; > 0 trains more at high noise, where the caption decides
    the direction of motion (pipeline/demo/recipe.py: 0.5 learns direction a few hundred steps sooner)."""
    checkpoint_every: int = 500
    """Checkpoint interval in steps (an interrupted demo resumes from the newest)."""
    sample_steps: int = 20
    """Euler steps when sampling."""
    guidance: float = 3.0
    """Classifier-free guidance scale."""
    seeds_per_caption: int = 4
    """Videos sampled per held-out caption."""
    seed: int = 0
    """Seed of the data set, the model's initialisation and training noise, and the sampling noise."""

    def __post_init__(self):
        self.shapes = tuple(self.shapes)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int",) and (not isinstance(value, int) or isinstance(value, bool)
                                       or value < (0 if f.name in ("seed", "warmup", "checkpoint_every") else 1)):
                raise ValueError(f"DemoSettings.{f.name}={value!r} must be a positive integer")
        if self.text_encoder not in TEXT_KINDS:
            raise ValueError(f"DemoSettings.text_encoder={self.text_encoder!r}: use one of {TEXT_KINDS}")
        if self.size % (self.vae_spatial * self.patch):
            raise ValueError(f"DemoSettings.size={self.size} must be a multiple of vae_spatial x patch = "
                             f"{self.vae_spatial * self.patch}")
        if self.frames % 2:
            raise ValueError(f"DemoSettings.frames={self.frames} must be even (sp=2 shards the frames)")
        if self.held_out < 1:
            raise ValueError("DemoSettings.held_out must be at least 1: the demo scores held-out captions")
        for name in ("lr", "ema_decay", "caption_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"DemoSettings.{name}={getattr(self, name)!r} must be in [0, 1)")
        if not self.guidance > 0 or not self.fps > 0:
            raise ValueError(f"DemoSettings.guidance={self.guidance!r} and fps={self.fps!r} must be > 0")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["shapes"] = list(self.shapes)
        return out


# The --quick smoke run: a few videos, a tiny model, a few steps.
QUICK = {"train_videos": 32, "width": 32, "depth": 2, "steps": 12, "warmup": 2, "checkpoint_every": 0,
         "sample_steps": 4, "seeds_per_caption": 1, "text_dim": 16}


def demo_settings(quick: bool = False, *, seed: int = 0) -> DemoSettings:
    """The full demo's settings (from pipeline/demo/recipe.py when present) or the --quick ones."""
    base = DemoSettings()
    try:
        from pipeline.demo import recipe  # the measured recipe, once its experiments landed
    except ImportError:
        recipe = None
    if recipe is not None and hasattr(recipe, "demo_settings"):
        chosen = recipe.demo_settings(quick)
        values = dict(chosen) if isinstance(chosen, dict) else asdict(chosen)
        unknown = sorted(set(values) - {f.name for f in fields(DemoSettings)})
        if unknown:
            raise ValueError(f"pipeline/demo/recipe.py demo_settings({quick}) sets {unknown}, which DemoSettings "
                             "does not have; name DemoSettings fields (pipeline/demo/settings.py)")
        base = replace(base, **values)
    elif quick:
        base = replace(base, **QUICK)
    return replace(base, seed=seed)
