"""Validation during training: sample fixed captions with the EMA weights, write videos, log them.

Every rank takes part in gathering the EMA to rank 0 (pipeline/train/ema.py). The ranks of the first SP
group (ranks 0..sp-1, which include rank 0) then sample together: rank 0 broadcasts the EMA over that
group, each rank loads it into a PoM DiT in the training dtype prepared for sequence parallelism, and
`sample_sequence_parallel` generates each caption from the same seeded noise every time with the frames
sharded as in training (a video that needed sp to train fits the same way to sample). Rank 0 decodes
the latents with the VAE recorded in the latents' manifest (when it can be rebuilt here; otherwise the
first three latent channels are shown), writes MP4s under <output_dir>/samples/ and logs them to MLflow.
The other data-parallel groups wait at a barrier.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from pipeline.config import RunConfig
from pipeline.eval.clip_score import validation_clip_score
from pipeline.models.dit import PoMDiT
from pipeline.models.sampler import SamplerConfig, initial_noise
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.parallelize import parallelize_pom_dit
from pipeline.parallel.sampling import sample_sequence_parallel
from pipeline.train.conditioning import Conditioning

log = logging.getLogger(__name__)


def latents_to_video(latents: torch.Tensor) -> torch.Tensor:
    """Show latents (C, T, H, W) as a video (3, T, H, W) in [-1, 1] when no VAE is at hand."""
    channels = latents[:3] if latents.shape[0] >= 3 else latents[:1].expand(3, *latents.shape[1:])
    low, high = channels.min(), channels.max()
    return (channels - low) / (high - low).clamp_min(1e-6) * 2 - 1


@torch.no_grad()
def load_broadcast(model: torch.nn.Module, state: dict[str, torch.Tensor] | None, *, dims: ParallelDims,
                   device: torch.device) -> None:
    """Load rank 0's full fp32 tensors `state` into `model` on every rank of the first SP group (rank 0
    is in it), one tensor at a time: no rank holds a second copy of the model. Others pass None."""
    import torch.distributed as dist

    params = dict(model.named_parameters())
    if state is not None:
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise RuntimeError(f"EMA weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, param in params.items():
        if dims.sp == 1:
            value = state[name]
        else:
            value = (state[name].to(device=device, dtype=torch.float32).contiguous() if state is not None
                     else torch.empty(param.shape, dtype=torch.float32, device=device))
            dist.broadcast(value, src=0, group=dims.sp_group)
        param.copy_(value.reshape(param.shape))


class Validator:
    """The sampler and writer of the first SP group's ranks; built once, reused at every validation."""

    def __init__(self, config: RunConfig, model_config, conditioning: Conditioning, *, manifest: dict,
                 output_dir: Path, device: torch.device, dims: ParallelDims | None = None,
                 dtype: torch.dtype = torch.float32):
        """`dims`: the training topology (None: one process); `dtype`: the training dtype to sample in."""
        self.config, self.model_config, self.cond = config, model_config, conditioning
        self.dims = dims or ParallelDims(dp=1, sp=1, world_size=1, rank=0, build_groups=False)
        self.dtype = dtype
        self.device, self.out = device, Path(output_dir) / "samples"
        self.manifest = manifest
        self._vae, self._vae_tried = None, False
        self._clip: dict = {}  # the CLIP scorer, loaded at the first validation (pipeline/eval/clip_score.py)

    def _decoder(self):
        if not self._vae_tried:
            self._vae_tried = True
            fingerprint = self.manifest.get("vae")
            if fingerprint:
                try:
                    from pipeline.data.encode.vae_factory import vae_from_fingerprint

                    self._vae = vae_from_fingerprint(fingerprint, device=self.device)
                except Exception as err:  # noqa: BLE001 - validation must not stop training
                    log.warning("VAE of the latents cannot be rebuilt (%s); showing raw latent channels", err)
        return self._vae

    @torch.no_grad()
    def sample_latents(self, ema_state: dict[str, torch.Tensor] | None) -> list[torch.Tensor]:
        """Every validation caption's latents (1, C, T, H, W), the same on every rank of the SP group;
        `ema_state` is needed on rank 0 only (a collective over the first SP group)."""
        val = self.config.validation
        model = PoMDiT(self.model_config).to(self.device)
        load_broadcast(model, ema_state, dims=self.dims, device=self.device)
        model.to(dtype=self.dtype).eval()
        parallelize_pom_dit(model, self.dims)
        sampler = SamplerConfig(steps=val.steps, guidance=val.guidance, shift=val.shift, solver=val.solver)
        guided = val.guidance != 1.0
        null_text = self.cond.null_text.to(self.device, self.dtype) if guided else None
        null_mask = self.cond.null_mask.to(self.device) if guided else None
        out = []
        for i, shape in enumerate(self.cond.val_shapes):
            noise = initial_noise((1, *shape), val.seed + i, device=self.device).to(self.dtype)
            out.append(sample_sequence_parallel(
                model, noise, self.cond.val_text[i:i + 1].to(self.device, self.dtype),
                self.cond.val_mask[i:i + 1].to(self.device), dims=self.dims, config=sampler, null_text=null_text,
                null_mask=null_mask))  # (1, C, T, H, W)
        del model
        return out

    @torch.no_grad()
    def run(self, ema_state: dict[str, torch.Tensor] | None, step: int, tracker) -> list[Path]:
        """Sample every validation caption (all ranks of the first SP group); rank 0 writes and logs the
        videos and returns the MP4 files (the others an empty list)."""
        from pipeline.media import write_mp4

        val = self.config.validation
        all_latents = self.sample_latents(ema_state)
        if self.dims.rank != 0:
            return []
        self.out.mkdir(parents=True, exist_ok=True)
        written, decoded, captions = [], [], []
        for i, latents in enumerate(all_latents):
            latents = latents.float()
            vae = self._decoder()
            video = vae.decode(latents)[0] if vae is not None else latents_to_video(latents[0])  # (3, T', H', W')
            caption = self.cond.val_captions[i] if i < len(self.cond.val_captions) else f"prompt {i}"
            slug = re.sub(r"[^a-z0-9]+", "-", caption.lower()).strip("-")[:40] or "prompt"
            path = write_mp4(video.float().clamp(-1, 1).cpu(), self.out / f"step{step:08d}_{i:02d}_{slug}.mp4",
                             fps=val.fps, scale=None)
            tracker.log_video(path, step=step)
            written.append(path)
            if vae is not None:  # a CLIP score of raw latent channels would mean nothing
                decoded.append(video.float().clamp(-1, 1))
                captions.append(caption)
        score = validation_clip_score(val, decoded, captions, device=self.device, cache=self._clip)
        if score is not None:
            tracker.log_metrics({"validation/clip_score": score}, step=step)
        return written
