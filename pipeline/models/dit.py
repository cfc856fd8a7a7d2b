"""The text-to-video PoM DiT: DiT's AdaLN blocks with every attention replaced by a Polynomial Mixer.

Each block, conditioned on the timestep embedding through AdaLN (shift, scale, gate; zero-initialised
so a new block is the identity):

    x = x + g1 * crossPoM(mod(norm(x)), text, text_mask)       # video queries read the caption
    x = x + g2 * selfPoM(mod(norm(x)), token_mask[, causal])   # tokens mix with each other
    x = x + g3 * FFN(mod(norm(x)))

Timesteps may be per token-frame (B, F): the modulation is then per frame, which block-causal
(diffusion-forcing) training and frame-sequential sampling need. Padded token-frames are removed from
every self-PoM state through the token mask; cross-PoM and FFN are per token, so padding never reaches
valid tokens. The model knows nothing of process groups: sequence parallelism swaps each
`blocks[i].self_pom.reducer` and passes `frame_offset`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.configs import DiTConfig
from pipeline.models.embeddings import PatchEmbed, TextProjection, TimestepEmbed, sincos_3d, unpatchify
from pipeline.models.pom import PoM, PoMState


def _norm(width: int) -> nn.LayerNorm:
    return nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)


def _per_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, N, D) -> (B, F, N/F, D) so per-frame modulation (B, F, 1, D) broadcasts; F=1 if shared."""
    b, n, d = x.shape
    return x.view(b, frames, n // frames, d)


class PoMBlock(nn.Module):
    """Cross-PoM over text, self-PoM over video tokens, FFN; each with AdaLN shift/scale/gate."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.width
        self.norm_cross, self.norm_self, self.norm_ffn = _norm(d), _norm(d), _norm(d)
        options = dict(n_sel_heads=config.n_sel_heads, n_groups=config.n_groups) if config.variant == "v2" else {}
        self.cross_pom = PoM(d, config.degree, config.expand, config.variant, **options)
        self.self_pom = PoM(d, config.degree, config.expand, config.variant, **options)
        self.ffn = nn.Sequential(
            nn.Linear(d, config.mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(config.mlp_hidden, d)
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 9 * d))

    def _run(self, x: torch.Tensor, cond: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
             self_mix: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape
        frames = cond.shape[1]
        mods = self.modulation(cond).unsqueeze(2).chunk(9, dim=-1)  # 9 x (B, F, 1, D)

        def modulate(h, shift, scale):
            return (_per_frame(h, frames) * (1 + scale) + shift).view(b, n, d)

        def gated(h, gate):
            return (_per_frame(h, frames) * gate).view(b, n, d)

        h = self.cross_pom(modulate(self.norm_cross(x), mods[0], mods[1]), text, text_mask)  # (B, N, D)
        x = x + gated(h, mods[2])
        x = x + gated(self_mix(modulate(self.norm_self(x), mods[3], mods[4])), mods[5])
        x = x + gated(self.ffn(modulate(self.norm_ffn(x), mods[6], mods[7])), mods[8])
        return x

    def forward(self, x: torch.Tensor, cond: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None, token_mask: torch.Tensor | None = None,
                frame_tokens: int | None = None) -> torch.Tensor:
        """x (B, N, D); cond (B, F or 1, D); text (B, L, D); token_mask (B, N) bool or None."""
        return self._run(
            x, cond, text, text_mask,
            lambda h: self.self_pom(h, context_mask=token_mask, frame_tokens=frame_tokens),
        )

    def step(self, x: torch.Tensor, cond: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
             state: PoMState | None) -> tuple[torch.Tensor, PoMState]:
        """One token-frame x (B, T, D) given the self-PoM state of earlier frames -> (x, new state)."""
        new_state: list[PoMState] = []

        def mix(h):
            out, s = self.self_pom.step(h, state)
            new_state.append(s)
            return out

        return self._run(x, cond, text, text_mask, mix), new_state[0]


class FinalLayer(nn.Module):
    """Modulated norm and projection back to patches; zero-initialised so the model starts at 0."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm = _norm(config.width)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.width, 2 * config.width))
        self.proj = nn.Linear(config.width, config.patch_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        shift, scale = self.modulation(cond).unsqueeze(2).chunk(2, dim=-1)  # (B, F, 1, D)
        h = (_per_frame(self.norm(x), cond.shape[1]) * (1 + scale) + shift).view(b, n, d)
        return self.proj(h)  # (B, N, C * pt * p * p)


class PoMDiT(nn.Module):
    """Text-to-video diffusion transformer with PoM mixers; predicts the flow velocity."""

    def __init__(self, config: DiTConfig, *, gather: Callable[[nn.Module], AbstractContextManager] | None = None):
        """`gather(module)`: a context in which `module`'s own parameters are whole and writable, for
        construction under ZeRO-3's `deepspeed.zero.Init` (parameters are partitioned as soon as each
        submodule is built); None when they are ordinary tensors."""
        super().__init__()
        self.config = config
        d = config.width
        self.patch_embed = PatchEmbed(config.in_channels, config.patch_t, config.patch_size, d)
        self.time_embed = TimestepEmbed(d, config.freq_dim)
        self.text_proj = TextProjection(config.text_dim, d)
        self.blocks = nn.ModuleList(PoMBlock(config) for _ in range(config.depth))
        self.final = FinalLayer(config)
        self.activation_checkpointing = False
        self._init_weights(gather or (lambda module: nullcontext()))

    def _init_weights(self, gather: Callable[[nn.Module], AbstractContextManager]) -> None:
        # DiT's recipe: xavier linears, small timestep MLP, zero AdaLN and output (identity blocks,
        # zero output). PoM v2's polynomial coefficients, gate bias and grouped projection keep theirs.
        # One module at a time inside `gather`, in a fixed order: the random draws are the same with
        # and without ZeRO-3.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                with gather(module):
                    nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            with gather(layer):
                nn.init.normal_(layer.weight, std=0.02)
        for layer in [block.modulation[1] for block in self.blocks] + [self.final.modulation[1], self.final.proj]:
            with gather(layer):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in backward instead of keeping its activations."""
        self.activation_checkpointing = bool(enabled)

    # -- helpers --------------------------------------------------------------------------------------

    def _grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        if latents.dim() != 5 or latents.shape[1] != self.config.in_channels:
            raise ValueError(
                f"latents must be (B, C={self.config.in_channels}, T, H, W), got {tuple(latents.shape)}"
            )
        _, _, t, h, w = latents.shape
        self.config.check_latent_shape(t, h, w)
        c = self.config
        return t // c.patch_t, h // c.patch_size, w // c.patch_size

    def _time_cond(self, timesteps: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        """(B,) or (B, F) timesteps -> conditioning (B, 1 or F, D)."""
        if timesteps.dim() == 1 and timesteps.shape[0] == batch:
            timesteps = timesteps[:, None]
        if timesteps.dim() != 2 or timesteps.shape[0] != batch or timesteps.shape[1] not in (1, frames):
            raise ValueError(
                f"timesteps must be ({batch},) or ({batch}, {frames}) (one per token-frame), "
                f"got {tuple(timesteps.shape)}"
            )
        return self.time_embed(timesteps)  # (B, F or 1, D)

    def _embed_text(self, text: torch.Tensor, text_mask: torch.Tensor | None, batch: int) -> torch.Tensor:
        if text.dim() != 3 or text.shape[0] != batch or text.shape[2] != self.config.text_dim:
            raise ValueError(
                f"text must be ({batch}, L, text_dim={self.config.text_dim}), got {tuple(text.shape)}"
            )
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
        return self.text_proj(text)  # (B, L, D)

    def _embed_video(self, latents: torch.Tensor, grid: tuple[int, int, int], frame_offset: int):
        x = self.patch_embed(latents)  # (B, N, D)
        pos = sincos_3d(grid, self.config.width, frame_offset, device=x.device, dtype=x.dtype)
        return x + pos  # (B, N, D)

    # -- entry points ---------------------------------------------------------------------------------

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None, frame_mask: torch.Tensor | None = None,
                frame_offset: int = 0) -> torch.Tensor:
        """Velocity (B, C, T, H, W) of latents (B, C, T, H, W) at timesteps (B,) or (B, T/pt).

        text (B, L, text_dim) with text_mask (B, L) bool; frame_mask (B, T/pt) bool, False = padded
        token-frame (excluded from every self-PoM state); frame_offset = global index of the first
        local token-frame (sequence parallelism).
        """
        batch = latents.shape[0]
        grid = self._grid(latents)
        frames, frame_tokens = grid[0], grid[1] * grid[2]
        x = self._embed_video(latents, grid, frame_offset)  # (B, N, D)
        cond = self._time_cond(timesteps, batch, frames)  # (B, F or 1, D)
        text_emb = self._embed_text(text, text_mask, batch)  # (B, L, D)
        token_mask = None
        if frame_mask is not None:
            if tuple(frame_mask.shape) != (batch, frames):
                raise ValueError(f"frame_mask must be ({batch}, {frames}), got {tuple(frame_mask.shape)}")
            token_mask = frame_mask.bool().repeat_interleave(frame_tokens, dim=1)  # (B, N)
        causal_tokens = frame_tokens if self.config.causal else None
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cond, text_emb, text_mask, token_mask, causal_tokens,
                               use_reentrant=False)
            else:
                x = block(x, cond, text_emb, text_mask, token_mask, causal_tokens)
        out = self.final(x, cond)  # (B, N, C * pt * p * p)
        return unpatchify(out, self.config.in_channels, grid, self.config.patch_t, self.config.patch_size)

    def forward_frame(self, latent_frame: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                      text_mask: torch.Tensor | None, frame_index: int,
                      cache: list[PoMState] | None = None) -> tuple[torch.Tensor, list[PoMState]]:
        """Block-causal model, one token-frame at a time with constant memory.

        latent_frame (B, C, patch_t, H, W) is token-frame `frame_index`; timesteps (B,); cache holds
        each block's self-PoM state of the frames before it (None for the first frame). Returns the
        velocity (B, C, patch_t, H, W) and the caches including this frame: keep them only when the
        frame is final (the sampler encodes finished frames at t = 0, see pipeline/models/sampler.py).
        """
        if not self.config.causal:
            raise ValueError("forward_frame needs a block-causal model (DiTConfig.causal=True)")
        batch = latent_frame.shape[0]
        grid = self._grid(latent_frame)
        if grid[0] != 1:
            raise ValueError(f"forward_frame takes one token-frame of patch_t={self.config.patch_t} "
                             f"latent frames, got {latent_frame.shape[2]}")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} states, the model has {len(self.blocks)} blocks")
        x = self._embed_video(latent_frame, grid, frame_index)  # (B, T, D)
        cond = self._time_cond(timesteps.reshape(-1), batch, 1)  # (B, 1, D)
        text_emb = self._embed_text(text, text_mask, batch)  # (B, L, D)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, state = block.step(x, cond, text_emb, text_mask, None if cache is None else cache[i])
            new_cache.append(state)
        out = self.final(x, cond)  # (B, T, C * pt * p * p)
        velocity = unpatchify(out, self.config.in_channels, grid, self.config.patch_t, self.config.patch_size)
        return velocity, new_cache
