"""Validation during training: sample fixed captions with the EMA weights, write videos, log them.

Every rank takes part in gathering the EMA (a collective under ZeRO-3); rank 0 alone then loads it
into a plain, single-device PoM DiT, samples each caption from the same seeded noise every time,
decodes the latents with the VAE recorded in the latents' manifest (when it can be rebuilt here;
otherwise the first three latent channels are shown), writes MP4s under <output_dir>/samples/ and
logs them to MLflow. The other ranks wait at a barrier.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from pipeline.config import RunConfig
from pipeline.eval.clip_score import validation_clip_score
from pipeline.models.dit import PoMDiT
from pipeline.models.sampler import SamplerConfig, initial_noise, sample
from pipeline.train.conditioning import Conditioning

log = logging.getLogger(__name__)


def latents_to_video(latents: torch.Tensor) -> torch.Tensor:
    """Show latents (C, T, H, W) as a video (3, T, H, W) in [-1, 1] when no VAE is at hand."""
    channels = latents[:3] if latents.shape[0] >= 3 else latents[:1].expand(3, *latents.shape[1:])
    low, high = channels.min(), channels.max()
    return (channels - low) / (high - low).clamp_min(1e-6) * 2 - 1


class Validator:
    """Rank 0's sampler and writer; built once, reused at every validation."""

    def __init__(self, config: RunConfig, model_config, conditioning: Conditioning, *, manifest: dict,
                 output_dir: Path, device: torch.device):
        self.config, self.model_config, self.cond = config, model_config, conditioning
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
    def run(self, ema_state: dict[str, torch.Tensor], step: int, tracker) -> list[Path]:
        """Sample every validation caption with `ema_state`; returns the written MP4 files."""
        from pipeline.media import write_mp4

        val = self.config.validation
        model = PoMDiT(self.model_config)
        missing, unexpected = model.load_state_dict(ema_state, strict=False)
        if [m for m in missing if m in dict(model.named_parameters())] or unexpected:
            raise RuntimeError(f"EMA weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.to(self.device).eval()
        sampler = SamplerConfig(steps=val.steps, guidance=val.guidance, shift=val.shift, solver=val.solver)
        guided = val.guidance != 1.0
        self.out.mkdir(parents=True, exist_ok=True)
        written, decoded, captions = [], [], []
        for i, shape in enumerate(self.cond.val_shapes):
            noise = initial_noise((1, *shape), val.seed + i, device=self.device)
            latents = sample(
                model, noise, self.cond.val_text[i:i + 1].to(self.device), self.cond.val_mask[i:i + 1].to(self.device),
                config=sampler, null_text=self.cond.null_text.to(self.device) if guided else None,
                null_mask=self.cond.null_mask.to(self.device) if guided else None)  # (1, C, T, H, W)
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
        del model
        return written
