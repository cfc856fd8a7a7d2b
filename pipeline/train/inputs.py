"""The diffusion-specific preparation of a micro-batch, in one place: noise, timesteps, caption dropout,
and the slice of token-frames this rank holds.

Randomness is drawn per SAMPLE from a generator seeded by (seed, step, position of the sample in the
global batch). So:
- every SP rank of a group draws the same noise, timesteps and dropped captions for the full video
  before taking its slice of frames (the SP requirement);
- the draws do not depend on the data-parallel size, the micro-batch split or the process that holds
  the sample: 1 process and dp=2 train on identical inputs, and a resume (also with another dp)
  continues the same stream with no RNG state to restore.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from pipeline.config import FlowConfig
from pipeline.models.flow import drop_captions, make_training_inputs
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.parallelize import LocalBatch, shard_batch


def sample_seed(seed: int, step: int, position: int) -> int:
    """A 63-bit seed for one sample of one step (a hash, so neighbouring seeds are unrelated)."""
    digest = hashlib.sha256(f"pomvid-noise:{seed}:{step}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(kw_only=True)
class MicroBatch:
    """One rank's inputs of one forward/backward."""

    local: LocalBatch
    """Noisy latents of this rank's token-frames, their FrameShard, timesteps and target (extras)."""

    text: torch.Tensor
    """(B, L, text_dim) captions after dropout, in the model's dtype."""

    text_mask: torch.Tensor
    """(B, L) bool."""

    loss_frame_mask: torch.Tensor | None
    """(B, F) token-frames counted in the loss (None: all valid ones)."""

    tokens: int
    """Video tokens of the micro-batch over the whole video (for throughput)."""


def prepare_micro_batch(latents: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *,
                        positions: list[int], step: int, seed: int, flow: FlowConfig, patch_t: int,
                        patch_size: int, null_text: torch.Tensor | None, null_mask: torch.Tensor | None,
                        dims: ParallelDims, dtype: torch.dtype) -> MicroBatch:
    """latents (B, C, T, H, W), text (B, L, D), text_mask (B, L) of the full videos (identical on the SP
    ranks of a group); positions: each sample's index in the step's global batch."""
    noisy, timesteps, targets, texts, masks = [], [], [], [], []
    for i, position in enumerate(positions):
        gen = torch.Generator(device=latents.device).manual_seed(sample_seed(seed, step, position))
        x_t, t, target = make_training_inputs(
            latents[i:i + 1], generator=gen, patch_t=patch_t, per_frame_timesteps=flow.per_frame_timesteps,
            logit_mean=flow.logit_mean, logit_std=flow.logit_std, clean_prefix_prob=flow.clean_prefix_prob)
        caption, mask = text[i:i + 1], text_mask[i:i + 1]
        if flow.caption_dropout > 0 and null_text is not None:
            caption, mask = drop_captions(caption, mask, null_text, null_mask, prob=flow.caption_dropout,
                                          generator=gen)
        noisy.append(x_t)
        timesteps.append(t)
        targets.append(target)
        texts.append(caption)
        masks.append(mask)
    noisy_b = torch.cat(noisy)  # (B, C, T, H, W)
    t_b = torch.cat(timesteps)  # (B,) or (B, F)
    loss_mask = None
    if flow.per_frame_timesteps and not flow.loss_on_clean_frames:
        loss_mask = t_b > 0  # (B, F): clean-prefix frames (t = 0) are context, not targets
    local = shard_batch(noisy_b.to(dtype), dims, patch_t=patch_t, timesteps=t_b, target=torch.cat(targets))
    _, _, frames, height, width = latents.shape
    tokens = len(positions) * (frames // patch_t) * (height // patch_size) * (width // patch_size)
    return MicroBatch(local=local, text=torch.cat(texts).to(dtype), text_mask=torch.cat(masks).bool(),
                      loss_frame_mask=loss_mask, tokens=tokens)
