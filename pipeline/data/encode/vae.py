"""Video VAEs: the interface and a parameter-free pixel codec.

Every VAE maps a video (B, 3, T, H, W) in [-1, 1] to scaled latents (B, C, T', H', W'),
``latents = (z - shift_factor) * scaling_factor``, and back. The diffusers-backed implementations
(CogVideoX, per-frame KL) live in ``vae_diffusers.py`` so that importing this module stays cheap;
``vae_factory.build_vae`` builds any kind ("cogvideox", the default for real runs, "frame_kl", "pixel").
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from pipeline.data.encode.fingerprint import dtype_name, hash_config

PIXEL_CONFIG_FILE = "pixel_codec.json"


class VideoVAE(ABC):
    """Common checks and scaling; subclasses implement the raw (unscaled) encode/decode."""

    kind: str = ""
    # True: a causal video VAE keeps the first frame alone, so it needs 1 + k * temporal frames.
    causal_first_frame: bool = False

    @property
    @abstractmethod
    def latent_channels(self) -> int: ...

    @property
    @abstractmethod
    def temporal_compression(self) -> int: ...

    @property
    @abstractmethod
    def spatial_compression(self) -> int: ...

    @property
    @abstractmethod
    def scaling_factor(self) -> float: ...

    @property
    @abstractmethod
    def shift_factor(self) -> float: ...

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @abstractmethod
    def _encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) on self.device/self.dtype -> unscaled z (B, C, T', H', W')."""

    @abstractmethod
    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled z (B, C, T', H', W') -> video (B, 3, T, H, W)."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """JSON-able dict identifying the weights; compare two with ``fingerprint_diff``."""

    @abstractmethod
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the weights/config to ``folder`` so ``build_vae(kind, path=folder)`` reloads them."""

    # ---- frame counts and shapes -------------------------------------------------------------

    def valid_frames(self, frames: int) -> bool:
        tc = self.temporal_compression
        if frames < 1:
            return False
        return (frames - 1) % tc == 0 if self.causal_first_frame else frames % tc == 0

    def check_frames(self, frames: int) -> None:
        """Raise a ValueError naming the frame count and the nearest valid ones."""
        if self.valid_frames(frames):
            return
        tc = self.temporal_compression
        rule = f"1 + {tc}*k" if self.causal_first_frame else f"a multiple of {tc}"
        valid = [f for f in range(max(1, frames - 2 * tc), frames + 2 * tc + 1) if self.valid_frames(f)]
        lower = [f for f in valid if f < frames][-1:] or [None]
        upper = [f for f in valid if f > frames][:1]
        near = " or ".join(str(f) for f in [*lower, *upper] if f is not None)
        raise ValueError(
            f"{self.kind} VAE: frames={frames} is not a valid frame count; it needs {rule} frames "
            f"(temporal compression {tc}). Use {near}: change the bucket's frame count."
        )

    def latent_frames(self, frames: int) -> int:
        self.check_frames(frames)
        tc = self.temporal_compression
        return 1 + (frames - 1) // tc if self.causal_first_frame else frames // tc

    def video_frames(self, latent_frames: int) -> int:
        """Frame count that ``decode`` returns for ``latent_frames`` latent frames."""
        tc = self.temporal_compression
        return 1 + (latent_frames - 1) * tc if self.causal_first_frame else latent_frames * tc

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latents of one (3, frames, height, width) clip."""
        self._check_size(height, width)
        sc = self.spatial_compression
        return (self.latent_channels, self.latent_frames(frames), height // sc, width // sc)

    def _check_size(self, height: int, width: int) -> None:
        sc = self.spatial_compression
        if height % sc or width % sc or height < sc or width < sc:
            raise ValueError(
                f"{self.kind} VAE: height={height}, width={width} must be positive multiples of the "
                f"spatial compression {sc}: change the bucket's resolution."
            )

    # ---- encode / decode ---------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) float in [-1, 1] -> scaled latents (B, C, T', H', W') float32.

        Deterministic: the posterior mean, not a sample. The result is on ``video``'s device.
        """
        if video.ndim != 5 or video.shape[1] != 3 or not video.is_floating_point():
            raise ValueError(
                f"{self.kind} VAE: encode expects a float video (B, 3, T, H, W); got shape "
                f"{tuple(video.shape)} dtype {video.dtype}"
            )
        _, _, frames, height, width = video.shape
        self.check_frames(frames)
        self._check_size(height, width)
        lo, hi = float(video.min()), float(video.max())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(
                f"{self.kind} VAE: encode expects values in [-1, 1]; got [{lo:.3g}, {hi:.3g}]. "
                "Convert uint8 frames with x / 127.5 - 1."
            )
        z = self._encode_raw(video.to(self.device, self.dtype))  # (B, C, T', H', W')
        latents = (z.float() - self.shift_factor) * self.scaling_factor
        return latents.to(video.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, T', H', W') -> video (B, 3, T, H, W) float32 in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"{self.kind} VAE: decode expects latents (B, {self.latent_channels}, T', H', W'); "
                f"got shape {tuple(latents.shape)}"
            )
        z = latents.float() / self.scaling_factor + self.shift_factor
        video = self._decode_raw(z.to(self.device, self.dtype))  # (B, 3, T, H, W)
        return video.float().clamp(-1.0, 1.0).to(latents.device)


class PixelCodec(VideoVAE):
    """Parameter-free space-to-depth codec: exact inverse, for demos and tests.

    (B, 3, T, H, W) -> (B, 3 * t * s * s, T / t, H / s, W / s) with s = spatial, t = temporal.
    """

    kind = "pixel"

    def __init__(self, *, spatial: int = 2, temporal: int = 1, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0):
        for field, value in (("spatial", spatial), ("temporal", temporal)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PixelCodec: {field}={value!r} must be a positive integer")
        if not scaling_factor > 0:
            raise ValueError(f"PixelCodec: scaling_factor={scaling_factor!r} must be > 0")
        self.spatial, self.temporal = spatial, temporal
        self._scaling, self._shift = float(scaling_factor), float(shift_factor)

    @property
    def latent_channels(self) -> int:
        return 3 * self.temporal * self.spatial**2

    @property
    def temporal_compression(self) -> int:
        return self.temporal

    @property
    def spatial_compression(self) -> int:
        return self.spatial

    @property
    def scaling_factor(self) -> float:
        return self._scaling

    @property
    def shift_factor(self) -> float:
        return self._shift

    def config(self) -> dict:
        return {"spatial": self.spatial, "temporal": self.temporal,
                "scaling_factor": self._scaling, "shift_factor": self._shift}

    def _encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        st, ss = self.temporal, self.spatial
        x = video.reshape(b, c, t // st, st, h // ss, ss, w // ss, ss)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, 3, st, ss, ss, T', H', W')
        return x.reshape(b, c * st * ss * ss, t // st, h // ss, w // ss)

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        b, _, tl, hl, wl = z.shape
        st, ss = self.temporal, self.spatial
        x = z.reshape(b, 3, st, ss, ss, tl, hl, wl)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, 3, T', st, H', ss, W', ss)
        return x.reshape(b, 3, tl * st, hl * ss, wl * ss)

    def fingerprint(self) -> dict:
        config = self.config()
        return {"kind": self.kind, "source": None, "config": config, "config_hash": hash_config(config),
                "weights_hash": None, "dtype": dtype_name(self.dtype), **geometry_fields(self)}

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PIXEL_CONFIG_FILE).write_text(json.dumps(self.config(), indent=2))
        return folder


def geometry_fields(vae: VideoVAE) -> dict:
    return {"latent_channels": vae.latent_channels, "temporal_compression": vae.temporal_compression,
            "spatial_compression": vae.spatial_compression, "scaling_factor": vae.scaling_factor,
            "shift_factor": vae.shift_factor}
