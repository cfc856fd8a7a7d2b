"""Build a video VAE by kind, from weights or a config, or rebuild one from a cache's fingerprint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.data.encode.fingerprint import fingerprint_diff, parse_dtype
from pipeline.data.encode.vae import PIXEL_CONFIG_FILE, PixelCodec, VideoVAE

VAE_KINDS = ("cogvideox", "frame_kl", "pixel")


def _pixel_from_path(path: str | os.PathLike) -> PixelCodec:
    file = Path(path) / PIXEL_CONFIG_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"pixel VAE: {file} does not exist; write one with PixelCodec.save(folder)")
    return PixelCodec(**json.loads(file.read_text()))


def build_vae(kind: str, *, path: str | os.PathLike | None = None, config: dict | None = None,
              device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32,
              subfolder: str | None = None, tiling: bool = False, slicing: bool = False,
              seed: int = 0) -> VideoVAE:
    """Build a VAE of ``kind`` from a local folder / hub id (``path``) or random weights (``config``).

    ``config`` holds model kwargs (e.g. a tiny ``block_out_channels``) for a model with random weights
    drawn from ``seed``; ``tiling``/``slicing`` trade speed for memory (diffusers kinds only).
    """
    if kind not in VAE_KINDS:
        raise ValueError(f"unknown VAE kind {kind!r}: use one of {', '.join(VAE_KINDS)}")
    if path is not None and config is not None:
        raise ValueError(f"{kind} VAE: give path= (pretrained weights) or config= (random weights), not both")
    if kind == "pixel":
        return _pixel_from_path(path) if path is not None else PixelCodec(**(config or {}))
    if path is None and config is None:
        raise ValueError(
            f"{kind} VAE: give path= (a local folder or hub id of pretrained weights) or config= "
            "(model kwargs for random weights, e.g. in tests)"
        )
    from pipeline.data.encode.vae_diffusers import DIFFUSERS_VAES

    cls = DIFFUSERS_VAES[kind]
    options = {"device": device, "dtype": parse_dtype(dtype), "tiling": tiling, "slicing": slicing}
    if path is not None:
        return cls.from_pretrained(path, subfolder=subfolder, **options)
    return cls.from_config(config, seed=seed, **options)


def vae_from_fingerprint(fp: dict, *, device: str | torch.device = "cpu",
                         dtype: str | torch.dtype | None = None, verify: bool = True) -> VideoVAE:
    """Rebuild the VAE a fingerprint describes (e.g. for sampling from a precomputed cache).

    From ``fp["source"]`` when it has one, otherwise from its config and seed (random weights). With
    ``verify`` the rebuilt weights must hash to the fingerprint's. ``dtype`` casts after verifying.
    """
    kind = fp.get("kind")
    if kind not in VAE_KINDS:
        raise ValueError(f"VAE fingerprint: unknown kind {kind!r}; expected one of {', '.join(VAE_KINDS)}")
    if kind == "pixel":
        vae = PixelCodec(**fp["config"])
    else:
        options = fp.get("options") or {}
        common = {"device": device, "dtype": fp.get("dtype", "float32"),
                  "tiling": bool(options.get("tiling")), "slicing": bool(options.get("slicing"))}
        if fp.get("source"):
            vae = build_vae(kind, path=fp["source"], subfolder=fp.get("subfolder"), **common)
        elif fp.get("seed") is not None and fp.get("config") is not None:
            vae = build_vae(kind, config=fp["config"], seed=fp["seed"], **common)
        else:
            raise ValueError(f"{kind} VAE fingerprint has neither a source path nor config + seed to rebuild from")
    if verify:
        diff = fingerprint_diff(fp, vae.fingerprint())
        if diff:
            raise ValueError(
                f"{kind} VAE rebuilt from {fp.get('source') or 'config'} does not match the fingerprint "
                f"({'; '.join(diff)}): the weights changed since the cache was made"
            )
    if dtype is not None and kind != "pixel":
        vae.to(dtype=parse_dtype(dtype))
    return vae
