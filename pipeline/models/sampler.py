"""ODE sampling of the rectified flow (pipeline/models/flow.py) from t = 1 (noise) to t = 0 (data).

Euler or Heun steps on a schedule shifted SD3-style, t' = s t / (1 + (s - 1) t) (s > 1 spends more
steps at high noise, which larger videos need), with classifier-free guidance: the conditional and
the null-caption batches go through ONE forward, v = v_null + g (v_cond - v_null).

Block-causal models generate frame by frame. The semantics, shared by both paths below:
  for each token-frame f: integrate frame f from noise to t = 0 while frames 0..f-1 are the already
  finished CLEAN latents at timestep t = 0; frames after f do not exist (block-causal: they could
  not matter anyway).
- `sample_sequential` does this with `PoMDiT.forward_frame`: the finished frames live only in each
  layer's self-PoM (sum, count), which grows by one clean pass at t = 0 per frame, so memory is
  constant in the number of frames.
- `sample` on a causal model runs the same loop with the parallel block-causal forward on frames
  0..f (prefix at t = 0). Since the parallel forward equals the stateful one, both paths are equal by
  construction; the parallel one is the reference (quadratic in frames, no cache).
The cond and null batches keep separate caches (their activations differ). Training sees clean
prefixes through flow.make_training_inputs(clean_prefix_prob=...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.models.flow import expand_null_text, match_text_length

SOLVERS = ("euler", "heun")
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t scalar tensor) -> v


@dataclass(kw_only=True)
class SamplerConfig:
    """How to integrate the flow ODE."""

    steps: int = 50
    """Number of solver steps (Heun costs two model calls per step but the last)."""

    guidance: float = 5.0
    """Classifier-free guidance scale g; 1 = conditional prediction only (needs no null caption)."""

    shift: float = 1.0
    """Timestep shift s > 0 (SD3); 1 = uniform schedule, > 1 = more steps near the noise."""

    solver: str = "euler"
    """"euler" or "heun"."""

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SamplerConfig.steps={self.steps!r} must be a positive integer")
        if not self.shift > 0:
            raise ValueError(f"SamplerConfig.shift={self.shift!r} must be > 0")
        if self.solver not in SOLVERS:
            raise ValueError(f"SamplerConfig.solver={self.solver!r} is unknown; use one of {SOLVERS}")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift t' = s t / (1 + (s - 1) t): keeps 0 and 1, moves the middle towards 1 for s > 1."""
    return shift * t / (1 + (shift - 1) * t)


def timestep_schedule(steps: int, shift: float = 1.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """steps + 1 timesteps from 1 down to 0."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift).to(dtype)


def initial_noise(shape: tuple[int, ...], seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the CPU from `seed`, so a seed gives the same video on any device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def integrate(velocity: Velocity, x: torch.Tensor, schedule: torch.Tensor, solver: str) -> torch.Tensor:
    """Solve dx/dt = velocity(x, t) along `schedule` (decreasing) with Euler or Heun."""
    for i in range(len(schedule) - 1):
        t, t_next = schedule[i], schedule[i + 1]
        dt = t_next - t
        d = velocity(x, t)
        x_next = x + dt * d
        if solver == "heun" and t_next > 0:  # the last step (t_next = 0) stays Euler, as in EDM
            x_next = x + dt * 0.5 * (d + velocity(x_next, t_next))
        x = x_next
    return x


def _token_frames(noise: torch.Tensor, patch_t: int) -> int:
    if noise.dim() != 5 or noise.shape[2] % patch_t:
        raise ValueError(f"noise must be (B, C, T, H, W) with T a multiple of patch_t={patch_t}, "
                         f"got {tuple(noise.shape)}")
    return noise.shape[2] // patch_t


class _Guided:
    """Batches the conditional and null captions and combines the two velocities."""

    def __init__(self, text, text_mask, null_text, null_mask, guidance: float):
        batch = text.shape[0]
        text_mask = text_mask.bool()
        if null_text is None:
            if guidance != 1.0:
                raise ValueError(f"guidance={guidance} needs null_text and null_mask (the empty caption)")
            self.text, self.mask, self.copies = text, text_mask, 1
        else:
            length = max(text.shape[1], null_text.reshape(-1, null_text.shape[-1]).shape[0])
            text, text_mask = match_text_length(text, text_mask, length)
            null, null_m = expand_null_text(null_text.to(text), null_mask.to(text.device), batch, length)
            self.text, self.mask, self.copies = torch.cat([text, null]), torch.cat([text_mask, null_m]), 2
        self.guidance = guidance

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] * self.copies)

    def combine(self, v: torch.Tensor) -> torch.Tensor:
        if self.copies == 1:
            return v
        cond, null = v.chunk(2)
        return null + self.guidance * (cond - null)


@torch.no_grad()
def sample(model, noise: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *,
           config: SamplerConfig, null_text: torch.Tensor | None = None,
           null_mask: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Generate latents (B, C, T, H, W) from `noise` of that shape with the full-sequence forward.

    Bidirectional models denoise all frames together. Block-causal models follow the frame-by-frame
    semantics of this module's docstring (same result as `sample_sequential`). text (B, L, text_dim),
    text_mask (B, L); null_text (L0, text_dim) and null_mask (L0,) are needed when guidance != 1.
    """
    guided = _Guided(text, text_mask, null_text, null_mask, config.guidance)
    schedule = timestep_schedule(config.steps, config.shift, device=noise.device, dtype=noise.dtype)
    cfg = model.config
    if not cfg.causal:
        mask = None if frame_mask is None else guided.batch(frame_mask)

        def velocity(x, t):
            xb = guided.batch(x)
            return guided.combine(model(xb, t.expand(xb.shape[0]), guided.text, guided.mask, mask))

        return integrate(velocity, noise, schedule, config.solver)
    if frame_mask is not None:
        raise ValueError("frame_mask is for padded training batches; causal generation has no padding")
    pt, frames = cfg.patch_t, _token_frames(noise, cfg.patch_t)
    done: list[torch.Tensor] = []
    for f in range(frames):
        prefix = guided.batch(torch.cat(done, dim=2)) if done else None  # clean frames 0..f-1

        def velocity(x, t, prefix=prefix, f=f):
            xb = guided.batch(x)
            latents = xb if prefix is None else torch.cat([prefix, xb], dim=2)
            timesteps = torch.zeros(xb.shape[0], f + 1, dtype=x.dtype, device=x.device)
            timesteps[:, f] = t  # finished frames at t = 0
            v = model(latents, timesteps, guided.text, guided.mask)
            return guided.combine(v[:, :, f * pt:])

        done.append(integrate(velocity, noise[:, :, f * pt:(f + 1) * pt], schedule, config.solver))
    return torch.cat(done, dim=2)


@torch.no_grad()
def sample_sequential(model, noise: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *,
                      config: SamplerConfig, null_text: torch.Tensor | None = None,
                      null_mask: torch.Tensor | None = None,
                      on_frame: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Frame-sequential generation for block-causal models with per-layer (sum, count) caches.

    Same arguments and result as `sample`; on_frame(f, latent_frame) is called as each token-frame
    is finished (e.g. to decode and stream it), so a caller can also drop the returned frames.
    """
    latents, _ = sample_sequential_from(model, noise, text, text_mask, config=config, null_text=null_text,
                                        null_mask=null_mask, on_frame=on_frame)
    return latents


@torch.no_grad()
def sample_sequential_from(model, noise: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *,
                           config: SamplerConfig, null_text: torch.Tensor | None = None,
                           null_mask: torch.Tensor | None = None, first_frame: int = 0, cache: list | None = None,
                           on_frame: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, list]:
    """`sample_sequential` continuing a video: `noise` holds token-frames first_frame.. of it, `cache` the
    per-layer states of the frames before (None at the start; batch doubled when guided). Returns the
    latents and the caches including the new frames (sequence-parallel sampling hands them to the next
    rank, pipeline/parallel/sampling.py)."""
    if not model.config.causal:
        raise ValueError("sample_sequential needs a block-causal model (DiTConfig.causal=True)")
    guided = _Guided(text, text_mask, null_text, null_mask, config.guidance)
    schedule = timestep_schedule(config.steps, config.shift, device=noise.device, dtype=noise.dtype)
    pt, frames = model.config.patch_t, _token_frames(noise, model.config.patch_t)
    done = []
    for i in range(frames):
        f = first_frame + i

        def velocity(x, t, cache=cache, f=f):
            xb = guided.batch(x)
            v, _ = model.forward_frame(xb, t.expand(xb.shape[0]), guided.text, guided.mask, f, cache)
            return guided.combine(v)

        frame = integrate(velocity, noise[:, :, i * pt:(i + 1) * pt], schedule, config.solver)
        clean = guided.batch(frame)
        zeros = torch.zeros(clean.shape[0], dtype=frame.dtype, device=frame.device)
        _, cache = model.forward_frame(clean, zeros, guided.text, guided.mask, f, cache)  # t = 0 state
        if on_frame is not None:
            on_frame(f, frame)
        done.append(frame)
    return torch.cat(done, dim=2), cache
