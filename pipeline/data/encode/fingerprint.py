"""Fingerprints of encoder weights, shared by the VAE and the text encoders.

A precomputed latent cache is only valid for the exact encoder that made it. A fingerprint is a
JSON-able dict; its identity fields (kind, config hash, weights hash, dtype and whatever else changes
the numbers) decide whether two encoders are the same. Where the weights came from (``source``) is
recorded to rebuild the encoder, but is not part of the identity: the same weights copied to another
folder still match.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

# Fields that never decide identity: where the weights came from, memory-only settings, and the
# config itself (its hash is an identity field).
NON_IDENTITY_FIELDS = frozenset(
    {"source", "subfolder", "tokenizer_subfolder", "model_name", "options", "seed", "config"}
)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype, *, field: str = "dtype") -> torch.dtype:
    """Accept a torch dtype or its name ("float32", "bf16", ...)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"{field}={dtype} is not supported: use float32, float16 or bfloat16")
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"{field}={dtype!r} is not a known dtype: use one of {sorted(_DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hash_config(config: Any) -> str:
    """sha256 of a JSON-able config, key order independent."""
    text = json.dumps(jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def hash_state_dict(module: torch.nn.Module) -> str:
    """sha256 over every tensor (name, shape, dtype, raw bytes) in a fixed order.

    Hashing the tensors rather than the files works the same for a local folder, the hub cache and a
    model made in memory. Cost: one pass over the weights (well under a second for a 200M-parameter VAE).
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        # view as bytes so bfloat16 (which numpy lacks) hashes the same way as every other dtype
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def jsonable(value: Any) -> Any:
    """Convert configs (FrozenDict, tuples, dtypes, paths) to plain JSON types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def fingerprint_diff(a: dict, b: dict) -> list[str]:
    """Identity fields that differ between two fingerprints, as 'field: a != b'; [] means the same."""
    keys = sorted((set(a) | set(b)) - NON_IDENTITY_FIELDS)
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def is_local_path(path: str | os.PathLike) -> bool:
    """A path that must exist here (absolute, ./, ~, or existing) rather than a hub id like 'org/name'."""
    text = os.fspath(path)
    return os.path.isabs(text) or text.startswith((".", "~")) or os.path.exists(text)


def check_source(path: str | os.PathLike, *, what: str) -> str:
    """Return the path as a string; a local path that does not exist is a clear error."""
    text = os.fspath(path)
    if is_local_path(text) and not os.path.exists(os.path.expanduser(text)):
        raise FileNotFoundError(
            f"{what}: path {text!r} does not exist. Give an existing local folder or a hub id (org/name)."
        )
    return os.path.expanduser(text) if is_local_path(text) else text


def load_error(what: str, source: str, err: Exception) -> OSError:
    """Explain a failed from_pretrained: wrong folder, or a hub id not in the offline cache."""
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    hint = (
        "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        if offline
        else "check the hub id, your network and your token"
    )
    local = is_local_path(source)
    detail = "the folder does not hold a saved model of this kind" if local else hint
    return OSError(f"{what}: could not load from {source!r}: {detail} ({type(err).__name__}: {err})")
