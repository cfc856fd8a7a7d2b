"""Sampling with sequence parallelism: one video generated across the ranks of an SP group.

Every rank of the group starts from the same full noise (e.g. `sampler.initial_noise(shape, seed)`)
and the same text, and ends with the same full latents, equal to single-process sampling up to
float rounding of the state sums.

- Bidirectional models: each rank integrates the ODE of its own token-frames only (Euler/Heun and
  classifier-free guidance are elementwise, so they commute with sharding); the only communication
  per model call is the PoM state of each self-PoM layer. One all-gather of the latents at the end.
- Block-causal models: frame-sequential generation relayed over the group. Rank r generates the
  token-frames it holds in training, one by one with the per-layer PoM caches
  (`sampler.sample_sequential_from`), starting from the caches rank r-1 sends when its last frame is
  done, and sends its own on to rank r+1: no rank recomputes earlier frames and each keeps only its
  frames and one state per layer. The ranks work one after the other (the same time as one device,
  1/P of the video's memory each); one all-gather of the latents at the end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pipeline.models.pom import PoMState, state_dtype
from pipeline.models.sampler import SamplerConfig, sample, sample_sequential_from
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.parallelize import comm_counter
from pipeline.parallel.sharding import FrameShard, gather_frames, shard_latents


class _LocalShard:
    """The model as the sampler sees it on one rank: local latents in, local velocity out."""

    def __init__(self, model: nn.Module, shard: FrameShard):
        self.model, self.config, self.shard = model, model.config, shard

    def __call__(self, latents, timesteps, text, text_mask, frame_mask=None):
        # latents (B', C, T_local, H, W); frame_mask (B', F_local): the sampler batched it for CFG.
        return self.model(latents, timesteps, text, text_mask, frame_mask, self.shard.frame_offset)


def _exchange_caches(cache: list[PoMState] | None, model: nn.Module, *, batch: int, like: torch.Tensor,
                     dims: ParallelDims) -> list[PoMState] | None:
    """Receive the previous SP rank's caches (None on SP rank 0). `batch`: the cached batch."""
    if dims.sp_rank == 0:
        return cache
    source = dims.sp_group_ranks[dims.sp_rank - 1]
    dtype = state_dtype(like.dtype)
    out = []
    for block in model.blocks:
        total = torch.empty(batch, block.self_pom.state_dim, dtype=dtype, device=like.device)
        count = torch.empty(batch, 1, dtype=dtype, device=like.device)
        dist.recv(total, src=source)
        dist.recv(count, src=source)
        out.append(PoMState(total, count))
    return out


def _send_caches(cache: list[PoMState], dims: ParallelDims) -> None:
    if dims.sp_rank == dims.sp - 1:
        return
    target = dims.sp_group_ranks[dims.sp_rank + 1]
    for state in cache:
        dist.send(state.sum.contiguous(), dst=target)
        dist.send(state.count.contiguous(), dst=target)


@torch.no_grad()
def _sample_causal_relay(model: nn.Module, noise: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *,
                         dims: ParallelDims, config: SamplerConfig, null_text: torch.Tensor | None,
                         null_mask: torch.Tensor | None) -> torch.Tensor:
    """Block-causal sampling relayed over the SP group (module docstring); full latents on every rank."""
    pt = model.config.patch_t
    local, shard = shard_latents(noise, sp_rank=dims.sp_rank, sp_size=dims.sp, patch_t=pt, allow_idle_ranks=True)
    valid = max(0, min(shard.local_token_frames, shard.token_frames - shard.frame_offset))
    batch = noise.shape[0] * (2 if null_text is not None else 1)  # the guided batch the caches hold
    cache = _exchange_caches(None, model, batch=batch, like=noise, dims=dims)
    out = torch.zeros_like(local)  # (B, C, T_local, H, W); padded frames stay zero
    if valid:
        frames, cache = sample_sequential_from(
            model, local[:, :, :valid * pt], text, text_mask, config=config, null_text=null_text,
            null_mask=null_mask, first_frame=shard.frame_offset, cache=cache)
        out[:, :, :valid * pt] = frames
    _send_caches(cache, dims)  # a rank past the video passes the caches on unchanged
    return gather_frames(out, shard, dims.sp_group)


@torch.no_grad()
def sample_sequence_parallel(model: nn.Module, noise: torch.Tensor, text: torch.Tensor,
                             text_mask: torch.Tensor, *, dims: ParallelDims, config: SamplerConfig,
                             null_text: torch.Tensor | None = None, null_mask: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """`sampler.sample` across the SP group of `dims`: same arguments, full latents (B, C, T, H, W)
    returned on every rank. `model` must have gone through `parallelize_pom_dit(model, dims)`."""
    if comm_counter(model) is None:
        raise ValueError("sample_sequence_parallel needs a model prepared by parallelize_pom_dit(model, dims)")
    if not dims.sp_enabled:
        return sample(model, noise, text, text_mask, config=config, null_text=null_text, null_mask=null_mask)
    if model.config.causal:
        return _sample_causal_relay(model, noise, text, text_mask, dims=dims, config=config, null_text=null_text,
                                    null_mask=null_mask)
    local, shard = shard_latents(noise, sp_rank=dims.sp_rank, sp_size=dims.sp, patch_t=model.config.patch_t)
    out = sample(_LocalShard(model, shard), local, text, text_mask, config=config, null_text=null_text,
                 null_mask=null_mask, frame_mask=shard.frame_mask)  # (B, C, T_local, H, W)
    return gather_frames(out, shard, dims.sp_group)
