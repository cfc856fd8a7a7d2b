"""Sharding of latent batches along token-frames for sequence parallelism, and the inverse.

A video of T latent frames has F = T / patch_t token-frames. It is padded at the end to a multiple of
the SP degree P (F_pad = P * ceil(F / P)) and SP rank r holds token-frames [r * F_pad / P,
(r + 1) * F_pad / P). Padded token-frames are marked False in the local `frame_mask`, which the DiT
removes from every self-PoM state and the SP loss removes from the loss. Each rank's `frame_offset`
(global index of its first token-frame) gives the position embeddings their global frame index.

Every SP rank of a group receives the same full batch from the loader and shards it locally, so no
communication is needed to shard; gathering (sampling, tests) is one all-gather per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True, kw_only=True, eq=False)  # eq=False: it holds tensors
class FrameShard:
    """Which token-frames of a video one SP rank holds."""

    sp_rank: int
    """Position of the rank in its SP group."""

    sp_size: int
    """SP degree P."""

    patch_t: int
    """Latent frames per token-frame (the DiT's temporal patch)."""

    token_frames: int
    """Token-frames F of the unpadded video."""

    padded_token_frames: int
    """F_pad = P * ceil(F / P)."""

    frame_offset: int
    """Global index of this rank's first token-frame (for the position embeddings)."""

    frame_mask: torch.Tensor
    """(B, F_pad / P) bool: True for this rank's real token-frames, False for padding (and for frames
    the caller's own frame mask already excluded)."""

    global_frame_mask: torch.Tensor
    """(B, F_pad) bool: the same for the whole video, known on every rank (used by the SP loss)."""

    @property
    def local_token_frames(self) -> int:
        return self.padded_token_frames // self.sp_size

    @property
    def local_slice(self) -> slice:
        """Token-frames of this rank, in padded global indices."""
        return slice(self.frame_offset, self.frame_offset + self.local_token_frames)

    def shard(self, x: torch.Tensor, dim: int, per_token_frame: int = 1, pad_value: float = 0.0):
        """This rank's slice of x along `dim`, where x has `per_token_frame` entries per token-frame
        (latents along T: patch_t; per-frame timesteps or masks along F: 1). Pads with pad_value."""
        full = self.token_frames * per_token_frame
        if x.shape[dim] != full:
            raise ValueError(f"dim {dim} of shape {tuple(x.shape)} should have {full} entries "
                             f"({self.token_frames} token-frames x {per_token_frame})")
        pad = (self.padded_token_frames - self.token_frames) * per_token_frame
        if pad:
            dim = dim % x.dim()
            widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]  # F.pad lists dims from the last one
            x = F.pad(x, widths, value=pad_value)
        start = self.frame_offset * per_token_frame
        return x.narrow(dim, start, self.local_token_frames * per_token_frame)


def plan_shard(token_frames: int, sp_size: int, sp_rank: int, *,
               allow_idle_ranks: bool = False) -> tuple[int, int]:
    """(padded token-frames, frame offset) of rank `sp_rank` among `sp_size` for `token_frames`.

    allow_idle_ranks: accept sp_size > token_frames (ranks past the video hold one padded frame);
    only the block-causal sampler needs it, for its first, short prefixes.
    """
    if token_frames < 1:
        raise ValueError(f"a video needs at least one token-frame, got {token_frames}")
    if sp_size > token_frames and not allow_idle_ranks:
        raise ValueError(
            f"sp={sp_size} is larger than the number of latent token-frames {token_frames}: "
            f"sequence parallelism shards whole token-frames; use sp <= {token_frames} or longer videos"
        )
    if not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank={sp_rank} is outside an SP group of {sp_size} ranks")
    local = -(-token_frames // sp_size)  # ceil
    return local * sp_size, sp_rank * local


def shard_latents(latents: torch.Tensor, *, sp_rank: int, sp_size: int, patch_t: int = 1,
                  frame_mask: torch.Tensor | None = None,
                  allow_idle_ranks: bool = False) -> tuple[torch.Tensor, FrameShard]:
    """Slice latents (B, C, T, H, W) along T for one SP rank -> (local latents, FrameShard).

    frame_mask (B, T / patch_t) bool, optional: token-frames the caller already marks as padding.
    """
    if latents.dim() != 5:
        raise ValueError(f"latents must be (B, C, T, H, W), got shape {tuple(latents.shape)}")
    batch, _, frames = latents.shape[:3]
    if frames % patch_t:
        raise ValueError(f"latents have T={frames} frames, not a multiple of patch_t={patch_t}")
    token_frames = frames // patch_t
    padded, offset = plan_shard(token_frames, sp_size, sp_rank, allow_idle_ranks=allow_idle_ranks)
    if frame_mask is None:
        frame_mask = torch.ones(batch, token_frames, dtype=torch.bool, device=latents.device)
    elif tuple(frame_mask.shape) != (batch, token_frames):
        raise ValueError(f"frame_mask must be ({batch}, {token_frames}) (one per token-frame), "
                         f"got {tuple(frame_mask.shape)}")
    global_mask = F.pad(frame_mask.bool(), (0, padded - token_frames), value=False)  # (B, F_pad)
    local = padded // sp_size
    shard = FrameShard(sp_rank=sp_rank, sp_size=sp_size, patch_t=patch_t, token_frames=token_frames,
                       padded_token_frames=padded, frame_offset=offset,
                       frame_mask=global_mask[:, offset:offset + local], global_frame_mask=global_mask)
    return shard.shard(latents, dim=2, per_token_frame=patch_t), shard  # (B, C, T_pad / P, H, W)


def gather_frames(local: torch.Tensor, shard: FrameShard, group, dim: int = 2,
                  per_token_frame: int | None = None) -> torch.Tensor:
    """Inverse of `FrameShard.shard`: all-gather the slices of `group` along `dim` and drop the
    padding. Latents (B, C, T_local, H, W) -> (B, C, T, H, W) on every rank. Not differentiable."""
    per = shard.patch_t if per_token_frame is None else per_token_frame
    parts = [torch.empty_like(local) for _ in range(shard.sp_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, shard.token_frames * per)
