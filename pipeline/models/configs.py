"""PoM DiT configuration, the registry of model sizes, and the training-FLOPs count used for MFU.

Sizes follow DiT's naming (S/B/L/XL); only width and depth differ between them, the rest is shared
and can be overridden: `build_dit("B", causal=True, in_channels=16)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.models.pom import VARIANTS


@dataclass(kw_only=True)
class DiTConfig:
    """Architecture of a text-to-video PoM DiT. Every field has a default so a test can change one."""

    in_channels: int = 16
    """Latent channels C of the VAE (CogVideoX: 16). The model predicts a velocity of the same shape."""

    patch_t: int = 1
    """Temporal patch: latent frames per token-frame. T must be a multiple of it."""

    patch_size: int = 2
    """Spatial patch: latent pixels per token side. H and W must be multiples of it."""

    width: int = 384
    """Model width D (tokens, timestep and text embeddings). Must be even (sin-cos embeddings)."""

    depth: int = 12
    """Number of blocks (cross-PoM, self-PoM, FFN)."""

    degree: int = 2
    """Polynomial degree k of every PoM layer."""

    expand: int = 2
    """Expansion e of every PoM layer: the state has k * e * D numbers per sample."""

    variant: str = "v1"
    """PoM formulation: "v1" (the paper's, state k*e*D) or "v2" (the authors' `pom` package: learned
    polynomial coefficients, hard-sigmoid gate, state e*D). See pipeline/models/pom.py."""

    n_sel_heads: int = 1
    """v2 only: selection heads of every PoM. 0 or 1: one gate per state channel; H: H gate channels,
    each scaling e*D/H state channels (H must divide expand * width)."""

    n_groups: int = 1
    """v2 only: groups of the feature projection W_c (a grouped 1x1 projection; must divide width).
    1: W_c and W_s are one stacked matrix, one GEMM for both when self-mixing."""

    compile: bool = False
    """The trainer compiles each block with torch.compile (after sequence parallelism and activation
    checkpointing are applied; pipeline/models/compile.py). Changes speed, not the math."""

    text_dim: int = 4096
    """Width of the text encoder's embeddings (T5-XXL: 4096, CLIP ViT-L: 768)."""

    causal: bool = False
    """Block-causal self-PoM over token-frames (frame f reads frames 0..f): frame-sequential video."""

    mlp_ratio: float = 4.0
    """FFN hidden width as a multiple of `width`."""

    freq_dim: int = 256
    """Sinusoidal features of the timestep before its MLP."""

    def __post_init__(self):
        for name in ("in_channels", "patch_t", "patch_size", "width", "depth", "degree", "expand",
                     "text_dim", "freq_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DiTConfig.{name}={value!r} must be a positive integer")
        if self.width % 2:
            raise ValueError(f"DiTConfig.width={self.width} must be even (sin-cos position embeddings)")
        if self.freq_dim % 2:
            raise ValueError(f"DiTConfig.freq_dim={self.freq_dim} must be even (sin and cos halves)")
        if self.variant not in VARIANTS:
            raise ValueError(f"DiTConfig.variant={self.variant!r} is unknown; use one of {VARIANTS}")
        for name in ("n_sel_heads", "n_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "n_sel_heads" else 1):
                raise ValueError(f"DiTConfig.{name}={value!r} must be a {'non-negative' if name == 'n_sel_heads' else 'positive'} integer")
        if self.variant == "v1" and (self.n_sel_heads > 1 or self.n_groups > 1):
            raise ValueError(f"DiTConfig.n_sel_heads={self.n_sel_heads} and n_groups={self.n_groups} need "
                             "variant='v2' (v1, the paper's, has neither); set variant=v2 or leave them at 1")
        if self.n_sel_heads > 1 and (self.expand * self.width) % self.n_sel_heads:
            raise ValueError(f"DiTConfig.n_sel_heads={self.n_sel_heads} must divide expand*width="
                             f"{self.expand * self.width} (each head gates e*D/H state channels)")
        if self.width % self.n_groups:
            raise ValueError(f"DiTConfig.n_groups={self.n_groups} must divide width={self.width}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"DiTConfig.compile={self.compile!r} must be True or False")
        if not isinstance(self.causal, bool):
            raise ValueError(f"DiTConfig.causal={self.causal!r} must be True or False")
        if not self.mlp_ratio > 0 or self.mlp_hidden < 1:
            raise ValueError(f"DiTConfig.mlp_ratio={self.mlp_ratio!r} must be > 0 (FFN width ratio)")

    @property
    def mlp_hidden(self) -> int:
        """FFN hidden width."""
        return int(self.width * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Numbers in one patch: C * patch_t * patch_size^2."""
        return self.in_channels * self.patch_t * self.patch_size**2

    def check_latent_shape(self, frames: int, height: int, width: int) -> None:
        """Raise a clear error when a latent shape does not split into patches."""
        if frames % self.patch_t or height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"latent shape T={frames}, H={height}, W={width} does not split into patches of "
                f"patch_t={self.patch_t}, patch_size={self.patch_size}; crop or pad the latents"
            )


# Width and depth of each size (DiT's table). Degree 2, expand 2 come from DiTConfig's defaults.
DIT_SIZES: dict[str, dict[str, int]] = {
    "S": {"width": 384, "depth": 12},
    "B": {"width": 768, "depth": 12},
    "L": {"width": 1024, "depth": 24},
    "XL": {"width": 1152, "depth": 28},
}


def dit_config(size: str, **overrides) -> DiTConfig:
    """The config of a registered size with any field overridden."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; use one of {sorted(DIT_SIZES)}")
    return replace(DiTConfig(**DIT_SIZES[size]), **overrides)


def build_dit(size: str, **overrides):
    """Build a PoMDiT of a registered size; overrides are DiTConfig fields (e.g. causal=True)."""
    from pipeline.models.dit import PoMDiT

    return PoMDiT(dit_config(size, **overrides))


def _pom_flops(config: DiTConfig, queries: int, context: int) -> int:
    """Matmul FLOPs of one PoM forward: features on the context, gate and output on the queries."""
    d, hidden = config.width, config.expand * config.width
    if config.variant == "v1":  # features k*e*D, gate k*e*D, output from k*e*D
        state = config.degree * hidden
        return 2 * context * d * state + 2 * queries * d * state + 2 * queries * state * d
    gate = config.n_sel_heads if config.n_sel_heads > 1 else hidden
    feature = 2 * context * (d // config.n_groups) * hidden  # grouped: each output reads D/G inputs
    return feature + 2 * queries * d * gate + 2 * queries * hidden * d


def training_flops(config: DiTConfig, *, batch: int, frames: int, height: int, width: int,
                   text_len: int) -> int:
    """Matmul FLOPs of one training step (forward + backward = 3x forward) for latents of shape
    (batch, C, frames, height, width) and text of `text_len` tokens.

    Counts every Linear (2 * m * n * k); elementwise work (polynomials, norms, gates) is left out, as
    in the usual MFU convention. Modulation and timestep MLPs are counted once per token-frame
    (per-frame timesteps), an upper bound for a shared timestep and negligible either way.
    """
    config.check_latent_shape(frames, height, width)
    d = config.width
    token_frames = frames // config.patch_t
    tokens = token_frames * (height // config.patch_size) * (width // config.patch_size)
    per_block = (
        _pom_flops(config, tokens, text_len)  # cross-PoM: video queries, text context
        + _pom_flops(config, tokens, tokens)  # self-PoM
        + 2 * 2 * tokens * d * config.mlp_hidden  # FFN: two Linears
        + 2 * token_frames * d * 9 * d  # AdaLN: shift/scale/gate for three sublayers
    )
    outer = (
        2 * tokens * config.patch_dim * d  # patch embedding
        + 2 * tokens * d * config.patch_dim  # final projection
        + 2 * token_frames * d * 2 * d  # final AdaLN
        + 2 * text_len * (config.text_dim * d + d * d)  # text projection MLP
        + 2 * token_frames * (config.freq_dim * d + d * d)  # timestep MLP
    )
    return 3 * batch * (config.depth * per_block + outer)
