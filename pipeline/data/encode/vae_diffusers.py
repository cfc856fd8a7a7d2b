"""diffusers-backed video VAEs: CogVideoX (causal 3D) and a per-frame image KL VAE.

Import this module only when one is needed: diffusers takes seconds to import.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderKLCogVideoX

from pipeline.data.encode.fingerprint import (
    check_source,
    dtype_name,
    hash_config,
    hash_state_dict,
    jsonable,
    load_error,
    parse_dtype,
)
from pipeline.data.encode.vae import VideoVAE, geometry_fields


class _DiffusersVAE(VideoVAE):
    """Wraps a diffusers autoencoder; remembers where its weights came from for the fingerprint."""

    model_class: type = AutoencoderKL

    def __init__(self, model, *, source: str | None, subfolder: str | None, seed: int | None,
                 device: str | torch.device, dtype: torch.dtype, tiling: bool, slicing: bool):
        if model.dtype != dtype:  # casting warns even when it is a no-op
            model = model.to(dtype=dtype)
        self.model = model.to(device=device).eval().requires_grad_(False)
        self.source, self.subfolder, self.seed = source, subfolder, seed
        self.tiling, self.slicing = tiling, slicing
        if tiling:
            self.model.enable_tiling()
        if slicing:
            self.model.enable_slicing()
        self._weights_hash: str | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, subfolder: str | None = None, **options):
        source = check_source(path, what=f"{cls.kind} VAE")
        # A local pipeline folder (e.g. a CogVideoX checkout) keeps its VAE under vae/.
        if subfolder is None and os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
            if os.path.isfile(os.path.join(source, "vae", "config.json")):
                subfolder = "vae"
        try:
            model = cls.model_class.from_pretrained(
                source, subfolder=subfolder, torch_dtype=options["dtype"],
                # without accelerate diffusers falls back to this anyway, but warns at every load
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
            )
        except (OSError, ValueError) as err:
            raise load_error(f"{cls.kind} VAE", source, err) from err
        return cls(model, source=source, subfolder=subfolder, seed=None, **options)

    @classmethod
    def from_config(cls, config: dict, *, seed: int = 0, **options):
        if not isinstance(config, dict):
            raise TypeError(f"{cls.kind} VAE: config must be a dict of model kwargs, got {type(config).__name__}")
        try:
            with torch.random.fork_rng(devices=[]):  # random weights from `seed`, global RNG untouched
                torch.manual_seed(seed)
                model = cls.model_class(**config)
        except TypeError as err:
            raise ValueError(f"{cls.kind} VAE: invalid config {config}: {err}") from err
        return cls(model, source=None, subfolder=None, seed=seed, **options)

    # ---- properties ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.model.config.shift_factor or 0.0)

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
        self.model.to(device=device, dtype=None if dtype is None else parse_dtype(dtype))
        self._weights_hash = None
        return self

    # ---- identity -----------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        if self._weights_hash is None:  # one pass over the weights, then cached
            self._weights_hash = hash_state_dict(self.model)
        config = jsonable(dict(self.model.config))
        return {
            "kind": self.kind, "class": type(self.model).__name__, "source": self.source,
            "subfolder": self.subfolder, "seed": self.seed, "config": config,
            "config_hash": hash_config(config), "weights_hash": self._weights_hash,
            "dtype": dtype_name(self.dtype), **geometry_fields(self),
            "options": {"tiling": self.tiling, "slicing": self.slicing},
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """save_pretrained to ``folder``; from now on the fingerprint names it as the source."""
        folder = Path(folder)
        self.model.save_pretrained(folder)
        self.source, self.subfolder, self.seed = str(folder.resolve()), None, None
        return folder


class CogVideoXVAE(_DiffusersVAE):
    """diffusers ``AutoencoderKLCogVideoX``: causal 3D VAE, frames = 1 + k * temporal compression."""

    kind = "cogvideox"
    model_class = AutoencoderKLCogVideoX
    causal_first_frame = True

    @property
    def temporal_compression(self) -> int:
        # Only non-final blocks downsample, so a shallow (test) config compresses time less than
        # temporal_compression_ratio says.
        cfg = self.model.config
        levels = min(int(cfg.temporal_compression_ratio).bit_length() - 1, len(cfg.block_out_channels) - 1)
        return 2**levels

    def _encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        return self.model.encode(video).latent_dist.mode()  # (B, C, T', H', W')

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        latent_frames = z.shape[2]
        if latent_frames > 1 and latent_frames % 2 == 0:
            # diffusers' decoder treats the first chunk's first frame as the lone causal frame only
            # when that chunk has an odd length: decode one repeated frame more, drop its outputs.
            z = torch.cat([z, z[:, :, -1:]], dim=2)
        video = self.model.decode(z).sample  # (B, 3, T, H, W)
        return video[:, :, : self.video_frames(latent_frames)]


class FrameKLVAE(_DiffusersVAE):
    """diffusers ``AutoencoderKL`` applied frame by frame: temporal compression 1, any frame count."""

    kind = "frame_kl"
    model_class = AutoencoderKL

    @property
    def temporal_compression(self) -> int:
        return 1

    def _encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, 3, H, W)
        z = self.model.encode(frames).latent_dist.mode()  # (B*T, C, H', W')
        return z.reshape(b, t, *z.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, T, H', W')

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = z.shape
        frames = z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, C, H', W')
        video = self.model.decode(frames).sample  # (B*T, 3, H, W)
        return video.reshape(b, t, *video.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, 3, T, H, W)


DIFFUSERS_VAES: dict[str, type[_DiffusersVAE]] = {"cogvideox": CogVideoXVAE, "frame_kl": FrameKLVAE}
