"""Sampling with sequence parallelism: one video generated across the ranks of an SP group.

Every rank of the group starts from the same full noise (e.g. `sampler.initial_noise(shape, seed)`)
and the same text, and ends with the same full latents, equal to single-process sampling up to
float rounding of the state sums.

- Bidirectional models: each rank integrates the ODE of its own token-frames only (Euler/Heun and
  classifier-free guidance are elementwise, so they commute with sharding); the only communication
  per model call is the PoM state of each self-PoM layer. One all-gather of the latents at the end.
- Block-causal models: generation is frame by frame (pipeline/models/sampler.py); the prefix grows
  from 1 token-frame, so the velocity of each call is computed sharded and all-gathered (every rank
  then steps the same frame). Ranks past a short prefix hold one padded frame and idle. For long
  causal videos on one device, `sampler.sample_sequential` keeps constant memory instead.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.sampler import SamplerConfig, sample
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


class _ShardAndGather:
    """Full latents in, full velocity out; the forward itself runs sharded over the SP group."""

    def __init__(self, model: nn.Module, dims: ParallelDims):
        self.model, self.config, self.dims = model, model.config, dims

    def __call__(self, latents, timesteps, text, text_mask, frame_mask=None):
        dims, pt = self.dims, self.config.patch_t
        local, shard = shard_latents(latents, sp_rank=dims.sp_rank, sp_size=dims.sp, patch_t=pt,
                                     frame_mask=frame_mask, allow_idle_ranks=True)
        if timesteps.dim() == 2 and timesteps.shape[1] != 1:
            timesteps = shard.shard(timesteps, dim=1)  # (B', F_local)
        v = self.model(local, timesteps, text, text_mask, shard.frame_mask, shard.frame_offset)
        return gather_frames(v, shard, dims.sp_group)  # (B', C, T, H, W)


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
        return sample(_ShardAndGather(model, dims), noise, text, text_mask, config=config,
                      null_text=null_text, null_mask=null_mask)
    local, shard = shard_latents(noise, sp_rank=dims.sp_rank, sp_size=dims.sp, patch_t=model.config.patch_t)
    out = sample(_LocalShard(model, shard), local, text, text_mask, config=config, null_text=null_text,
                 null_mask=null_mask, frame_mask=shard.frame_mask)  # (B, C, T_local, H, W)
    return gather_frames(out, shard, dims.sp_group)
