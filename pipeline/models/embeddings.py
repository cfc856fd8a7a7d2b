"""Embeddings of the PoM DiT: 3D patches, 3D sin-cos positions, timesteps and text.

Token order is frame-major: the tokens of one token-frame (patch_t latent frames) are consecutive,
row-major over the spatial grid. Block-causal PoM and sequence parallelism (which shards whole
token-frames) both rely on it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def patchify(latents: torch.Tensor, patch_t: int, patch_size: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T/pt * H/p * W/p, C * pt * p * p), frame-major token order."""
    b, c, t, h, w = latents.shape
    pt, p = patch_t, patch_size
    if t % pt or h % p or w % p:
        raise ValueError(f"latents of T={t}, H={h}, W={w} do not split into patches pt={pt}, p={p}")
    x = latents.reshape(b, c, t // pt, pt, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, T', H', W', C, pt, p, p)
    return x.reshape(b, (t // pt) * (h // p) * (w // p), c * pt * p * p)


def unpatchify(tokens: torch.Tensor, channels: int, grid: tuple[int, int, int], patch_t: int,
               patch_size: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, C * pt * p * p) with grid (T', H', W') -> (B, C, T, H, W)."""
    b = tokens.shape[0]
    ft, fh, fw = grid
    pt, p = patch_t, patch_size
    x = tokens.reshape(b, ft, fh, fw, channels, pt, p, p)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, T', pt, H', p, W', p)
    return x.reshape(b, channels, ft * pt, fh * p, fw * p)


def sincos_1d(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Sin-cos features of float positions (...,) -> (..., dim); dim must be even."""
    half = dim // 2
    omega = torch.arange(half, dtype=torch.float64, device=positions.device) / max(half, 1)
    omega = theta ** (-omega)  # (half,)
    angles = positions.to(torch.float64)[..., None] * omega  # (..., half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def axis_dims(dim: int) -> tuple[int, int, int]:
    """Split an even width into even (time, height, width) parts: a quarter for time, the rest
    shared by the two spatial axes (videos have far more spatial than temporal positions)."""
    if dim % 2:
        raise ValueError(f"3D sin-cos embeddings need an even width, got {dim}")
    dim_t = 2 * (dim // 8)
    rest = dim - dim_t
    dim_h = 2 * (rest // 4)
    return dim_t, dim_h, rest - dim_h


def sincos_3d(grid: tuple[int, int, int], dim: int, frame_offset: int = 0,
              device=None, dtype=torch.float32) -> torch.Tensor:
    """3D sin-cos position embeddings of a (T', H', W') token grid -> (T' * H' * W', dim).

    Computed on the fly for any size. Frame positions are `frame_offset + local index`, so a
    sequence-parallel rank holding token-frames [offset, offset + T') gets the global positions.
    """
    ft, fh, fw = grid
    dim_t, dim_h, dim_w = axis_dims(dim)
    t = sincos_1d(torch.arange(ft, device=device) + frame_offset, dim_t)  # (T', dt)
    h = sincos_1d(torch.arange(fh, device=device), dim_h)  # (H', dh)
    w = sincos_1d(torch.arange(fw, device=device), dim_w)  # (W', dw)
    emb = torch.cat(
        [
            t[:, None, None].expand(ft, fh, fw, dim_t),
            h[None, :, None].expand(ft, fh, fw, dim_h),
            w[None, None, :].expand(ft, fh, fw, dim_w),
        ],
        dim=-1,
    )  # (T', H', W', D)
    return emb.reshape(ft * fh * fw, dim).to(dtype)


class PatchEmbed(nn.Module):
    """Linear projection of flattened 3D patches (same as a Conv3d with stride = kernel)."""

    def __init__(self, in_channels: int, patch_t: int, patch_size: int, width: int):
        super().__init__()
        self.patch_t, self.patch_size = patch_t, patch_size
        self.proj = nn.Linear(in_channels * patch_t * patch_size**2, width)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(latents, self.patch_t, self.patch_size))  # (B, N, D)


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of timesteps t in [0, 1] (any shape) -> (..., dim).

    t is scaled by 1000 so the frequencies span the same range as DiT's integer timesteps.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbed(nn.Module):
    """Timestep -> width: sinusoidal features then an MLP (Linear, SiLU, Linear)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(features)  # (..., D)


class TextProjection(nn.Module):
    """Text encoder embeddings -> model width (Linear, GELU-tanh, Linear), shared by all blocks."""

    def __init__(self, text_dim: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(text_dim, width), nn.GELU(approximate="tanh"), nn.Linear(width, width)
        )

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.mlp(text)  # (B, L, D)
