"""Rectified flow: the diffusion-specific preparation of a training step, in one place.

    x_t = (1 - t) x_0 + t eps,   target velocity v = eps - x_0,   t ~ logit-normal(mean, std)

t = 0 is data, t = 1 is noise; the sampler integrates dx/dt = v from t = 1 down to 0.

Sequence parallelism: `make_training_inputs` and `drop_captions` run on the FULL (unsharded) batch
with a torch.Generator seeded identically on every rank of an SP group, so all ranks draw the same
timesteps, noise and dropped captions; the trainer then slices its token-frames. `flow_matching_loss`
takes the global per-sample count of valid elements (`normaliser`) so that the SP ranks' local losses
sum to the unsharded loss.

Block-causal models (frame-sequential generation): the sampler denoises frame f while the frames
0..f-1 sit in the self-PoM cache as CLEAN latents encoded at t = 0 (pipeline/models/sampler.py).
Training must show the model that situation, which logit-normal t never does (t < 0.01 has
probability ~1e-6): with `clean_prefix_prob`, a sample gets a random number of leading token-frames
set to t = 0 exactly (x_t = x_0). Their target eps - x_0 is still the right expected velocity at
t = 0 (-x_0), only noisy; a trainer may drop them from the loss with `frame_mask & (timesteps > 0)`.
"""

from __future__ import annotations

import torch


def logit_normal(shape: tuple[int, ...], *, generator: torch.Generator, mean: float = 0.0,
                 std: float = 1.0) -> torch.Tensor:
    """t = sigmoid(mean + std * z), z ~ N(0, 1): float32 on the generator's device."""
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return torch.sigmoid(mean + std * z)


def make_training_inputs(
    latents: torch.Tensor,
    *,
    generator: torch.Generator,
    patch_t: int = 1,
    per_frame_timesteps: bool = False,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    clean_prefix_prob: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy latents, timesteps and velocity target for clean latents (B, C, T, H, W).

    Returns noisy (B, C, T, H, W) in latents' dtype, timesteps (B,) or, with per_frame_timesteps,
    (B, T // patch_t) (one independent t per token-frame, for block-causal training) in float32, and
    the target eps - x_0 (B, C, T, H, W). clean_prefix_prob (per-frame only): probability that a
    sample's first k token-frames (k uniform in 1..F-1) get t = 0, the clean context the
    frame-sequential sampler caches. Draws come from `generator` only, in a fixed order.
    """
    if latents.dim() != 5:
        raise ValueError(f"latents must be (B, C, T, H, W), got shape {tuple(latents.shape)}")
    batch, _, frames, _, _ = latents.shape
    if patch_t < 1 or frames % patch_t:
        raise ValueError(f"latent frames T={frames} must be a multiple of patch_t={patch_t}")
    if logit_std <= 0:
        raise ValueError(f"logit_std={logit_std} must be > 0")
    if not 0.0 <= clean_prefix_prob <= 1.0:
        raise ValueError(f"clean_prefix_prob={clean_prefix_prob} must be in [0, 1]")
    if clean_prefix_prob > 0 and not per_frame_timesteps:
        raise ValueError("clean_prefix_prob > 0 needs per_frame_timesteps=True (t = 0 on some frames)")
    token_frames = frames // patch_t
    shape = (batch, token_frames) if per_frame_timesteps else (batch,)
    timesteps = logit_normal(shape, generator=generator, mean=logit_mean, std=logit_std)
    eps = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
    if clean_prefix_prob > 0 and token_frames > 1:
        use = torch.rand(batch, generator=generator, device=generator.device) < clean_prefix_prob
        prefix = torch.randint(1, token_frames, (batch,), generator=generator, device=generator.device)
        clean = use[:, None] & (torch.arange(token_frames, device=generator.device) < prefix[:, None])
        timesteps = timesteps.masked_fill(clean, 0.0)  # (B, F)
    timesteps = timesteps.to(latents.device)
    eps = eps.to(device=latents.device, dtype=latents.dtype)
    # Broadcast t over (C, [frames], H, W); per-frame t covers the patch_t latent frames of its frame.
    t = timesteps if per_frame_timesteps else timesteps[:, None]
    t = t.repeat_interleave(frames // t.shape[1], dim=1)[:, None, :, None, None].to(latents.dtype)
    noisy = (1 - t) * latents + t * eps  # (B, C, T, H, W)
    return noisy, timesteps, eps - latents


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor | None = None,
                       normaliser: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean over samples of each sample's mean squared error over its valid elements.

    pred, target (B, C, T, H, W); frame_mask (B, F) bool over token-frames (F divides T; False =
    padding, excluded). normaliser: the number of valid elements of each sample, (B,) or a scalar,
    to use instead of the local count: a sequence-parallel rank passes the global count so that the
    ranks' losses SUM to the unsharded loss. Computed in float32.
    """
    if pred.shape != target.shape or pred.dim() != 5:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be equal (B,C,T,H,W)")
    batch, channels, frames, height, width = pred.shape
    err = (pred.float() - target.float()).square().sum(dim=(1, 3, 4))  # (B, T)
    if frame_mask is None:
        weights = torch.ones_like(err)
    else:
        if frame_mask.dim() != 2 or frame_mask.shape[0] != batch or frames % frame_mask.shape[1]:
            raise ValueError(f"frame_mask {tuple(frame_mask.shape)} must be (B={batch}, F) with F dividing T={frames}")
        weights = frame_mask.to(err.dtype).repeat_interleave(frames // frame_mask.shape[1], dim=1)  # (B, T)
    per_sample = (err * weights).sum(dim=1)  # (B,)
    if normaliser is None:
        normaliser = weights.sum(dim=1) * (channels * height * width)
    count = torch.as_tensor(normaliser, dtype=err.dtype, device=err.device).clamp_min(1.0)
    return (per_sample / count).mean()


def match_text_length(text: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad text (B, L, D) and mask (B, L) with masked-out zeros to `length` tokens (L <= length).

    Masked context tokens have no effect on PoM, so padding never changes the model's output.
    """
    extra = length - text.shape[1]
    if extra < 0:
        raise ValueError(f"cannot shorten text of {text.shape[1]} tokens to {length}")
    if extra == 0:
        return text, mask
    text = torch.cat([text, text.new_zeros(text.shape[0], extra, text.shape[2])], dim=1)
    return text, torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)


def expand_null_text(null_text: torch.Tensor, null_mask: torch.Tensor, batch: int, length: int):
    """The null caption (L0, D) or (1, L0, D) and its mask (L0,) or (1, L0) -> (B, length, D), (B, length)."""
    null_text = null_text.reshape(1, -1, null_text.shape[-1])
    null_mask = null_mask.reshape(1, -1).bool()
    if null_mask.shape[1] != null_text.shape[1]:
        raise ValueError(f"null_mask {tuple(null_mask.shape)} does not match null_text {tuple(null_text.shape)}")
    null_text, null_mask = match_text_length(null_text, null_mask, length)
    return null_text.expand(batch, -1, -1), null_mask.expand(batch, -1)


def drop_captions(text: torch.Tensor, text_mask: torch.Tensor, null_text: torch.Tensor,
                  null_mask: torch.Tensor, *, prob: float, generator: torch.Generator):
    """Replace each sample's caption by the null caption with probability `prob` (for CFG).

    text (B, L, D), text_mask (B, L); null_text (L0, D), null_mask (L0,). Returns (text, mask) of
    length max(L, L0). Draws B uniforms from `generator` (same on every SP rank).
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"caption dropout prob={prob} must be in [0, 1]")
    if null_text.shape[-1] != text.shape[-1]:
        raise ValueError(f"null_text width {null_text.shape[-1]} != text width {text.shape[-1]}")
    batch = text.shape[0]
    length = max(text.shape[1], null_text.reshape(-1, null_text.shape[-1]).shape[0])
    text, text_mask = match_text_length(text, text_mask.bool(), length)
    null_text, null_mask = expand_null_text(null_text.to(text), null_mask.to(text.device), batch, length)
    drop = (torch.rand(batch, generator=generator, device=generator.device) < prob).to(text.device)
    return torch.where(drop[:, None, None], null_text, text), torch.where(drop[:, None], null_mask, text_mask)
