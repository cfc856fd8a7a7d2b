"""Build a text encoder by kind ("t5", "clip"), or rebuild one from a cache's fingerprint."""

from __future__ import annotations

import os

import torch

from pipeline.data.encode.fingerprint import fingerprint_diff
from pipeline.data.encode.text import TextEncoder
from pipeline.data.encode.text_t5 import T5_DEFAULT_MAX_LENGTH, T5TextEncoder

TEXT_KINDS = ("t5", "clip")


def build_text_encoder(kind: str, *, path: str | os.PathLike | None = None, config: dict | None = None,
                       device: str | torch.device = "cpu", max_length: int | None = None,
                       dtype: str | torch.dtype = torch.float32, seed: int = 0, **kwargs) -> TextEncoder:
    """Build a text encoder of ``kind`` from a local folder / hub id (``path``) or a tiny ``config``.

    t5: ``path`` is a folder or hub id with the encoder and its tokenizer (``subfolder=``,
    ``tokenizer_subfolder=`` for pipeline repos); for random weights make a folder with make_tiny_t5.
    clip: see ``ClipTextEncoder`` (``path`` = open_clip local-dir, ``hf-hub:`` id, checkpoint file or
    pretrained tag with ``model_name=``; or ``config`` = an open_clip model config for random weights).
    """
    if kind not in TEXT_KINDS:
        raise ValueError(f"unknown text encoder kind {kind!r}: use one of {', '.join(TEXT_KINDS)}")
    if kind == "t5":
        if config is not None:
            raise ValueError(
                "t5 text encoder: config= is not supported because T5 needs a trained tokenizer; "
                "make a tiny one with make_tiny_t5(folder, captions) and pass path=folder"
            )
        if path is None:
            raise ValueError("t5 text encoder: give path= (a local folder or hub id with encoder + tokenizer)")
        return T5TextEncoder(path, max_length=max_length or T5_DEFAULT_MAX_LENGTH, device=device,
                             dtype=dtype, **kwargs)
    from pipeline.data.encode.text_clip import ClipTextEncoder

    return ClipTextEncoder(path=path, config=config, max_length=max_length, device=device, dtype=dtype,
                           seed=seed, **kwargs)


def text_encoder_from_fingerprint(fp: dict, *, device: str | torch.device = "cpu",
                                  verify: bool = True) -> TextEncoder:
    """Rebuild the text encoder a fingerprint describes; with ``verify`` its weights must match."""
    kind = fp.get("kind")
    if kind not in TEXT_KINDS:
        raise ValueError(f"text encoder fingerprint: unknown kind {kind!r}; expected one of {TEXT_KINDS}")
    common = {"device": device, "max_length": fp.get("max_length"), "dtype": fp.get("dtype", "float32")}
    if kind == "t5":
        encoder = build_text_encoder("t5", path=fp["source"], subfolder=fp.get("subfolder"),
                                     tokenizer_subfolder=fp.get("tokenizer_subfolder"), **common)
    elif fp.get("source"):
        encoder = build_text_encoder("clip", path=fp["source"], model_name=fp.get("model_name"), **common)
    elif fp.get("config") is not None and fp.get("seed") is not None:
        encoder = build_text_encoder("clip", config=fp["config"], seed=fp["seed"], **common)
    else:
        raise ValueError("clip text encoder fingerprint has neither a source nor config + seed to rebuild from")
    if verify:
        diff = fingerprint_diff(fp, encoder.fingerprint())
        if diff:
            raise ValueError(
                f"{kind} text encoder rebuilt from {fp.get('source') or 'config'} does not match the "
                f"fingerprint ({'; '.join(diff)}): the weights changed since the cache was made"
            )
    return encoder
