"""Text conditioning stored next to the latents, so that no training rank loads a text encoder.

Precompute writes <latents>/text_conditioning.safetensors once, with the same text encoder and max
length as the shards:
- the null caption's embedding (the encoding of "", for caption dropout and classifier-free guidance);
- optionally the embeddings of validation prompts (`--validation-prompts FILE`).
Training, validation and sampling read it. A T5-XXL encoder is about 10 GB of GPU memory beside the
model, so reading 100 KB of embeddings instead of loading it is the point.

Layout: a safetensors file (no pickle) with tensors
    null.text    (L0, D) float32   the null caption's valid tokens only
    null.mask    (L0,)   uint8     1 for valid tokens (all ones; an empty context has L0 = 1 and a 0)
    prompts.text (P, L, D) float32 padded to the longest prompt   } only when P > 0
    prompts.mask (P, L)  uint8                                   }
and string metadata: "schema" ("1"), "prompts" (JSON list of P strings), "text_encoder" (JSON of the
encoder fingerprint, pipeline/data/text.py, or null).
The file is serialised to bytes first and written with one atomic replace, so a reader never sees half
of it (and an object store gets one PUT).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import storage

FILE_NAME = "text_conditioning.safetensors"
SCHEMA = "1"


class TextConditioningError(ValueError):
    """The stored text conditioning is unreadable or inconsistent."""


@dataclass(kw_only=True)
class TextConditioning:
    null_text: torch.Tensor
    """(L0, D) float32: the null caption's embedding, valid tokens only."""
    null_mask: torch.Tensor
    """(L0,) bool."""
    prompts: list[str] = field(default_factory=list)
    """Validation prompts, in the order of prompt_text's rows."""
    prompt_text: torch.Tensor | None = None
    """(P, L, D) float32, padded; None when there are no prompts."""
    prompt_mask: torch.Tensor | None = None
    """(P, L) bool."""
    text_encoder: dict | None = None
    """The fingerprint of the encoder that made the embeddings (must match the shards')."""

    def __post_init__(self):
        if self.null_text.dim() != 2 or self.null_mask.shape != self.null_text.shape[:1]:
            raise TextConditioningError(
                f"null caption: text must be (L, D) with a (L,) mask, got {tuple(self.null_text.shape)} "
                f"and {tuple(self.null_mask.shape)}"
            )
        if self.prompts:
            text, mask = self.prompt_text, self.prompt_mask
            if text is None or mask is None or text.dim() != 3 or mask.shape != text.shape[:2]:
                raise TextConditioningError("prompts need prompt_text (P, L, D) and prompt_mask (P, L)")
            if text.shape[0] != len(self.prompts) or text.shape[2] != self.null_text.shape[1]:
                raise TextConditioningError(
                    f"{len(self.prompts)} prompts of width {self.null_text.shape[1]}, but prompt_text has shape "
                    f"{tuple(text.shape)}"
                )

    @property
    def text_dim(self) -> int:
        return int(self.null_text.shape[1])


def pad_embeddings(texts: list[torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (L_i, D) embeddings into (P, L, D) zero-padded float32 and a (P, L) bool mask."""
    length = max([1, *(int(t.shape[0]) for t in texts)])
    out = torch.zeros(len(texts), length, dim)
    mask = torch.zeros(len(texts), length, dtype=torch.bool)
    for i, text in enumerate(texts):
        out[i, : text.shape[0]] = text.float()
        mask[i, : text.shape[0]] = True
    return out, mask


def to_bytes(conditioning: TextConditioning) -> bytes:
    from safetensors.torch import save

    tensors = {
        "null.text": conditioning.null_text.float().contiguous(),
        "null.mask": conditioning.null_mask.to(torch.uint8).contiguous(),
    }
    if conditioning.prompts:
        tensors["prompts.text"] = conditioning.prompt_text.float().contiguous()
        tensors["prompts.mask"] = conditioning.prompt_mask.to(torch.uint8).contiguous()
    metadata = {
        "schema": SCHEMA,
        "prompts": json.dumps(list(conditioning.prompts)),
        "text_encoder": json.dumps(conditioning.text_encoder, sort_keys=True),
    }
    return save(tensors, metadata=metadata)


def from_bytes(data: bytes, *, source: str) -> TextConditioning:
    """Parse the file's bytes; `source` names the file in errors."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        # The format's header: 8 bytes of little-endian length, then JSON holding "__metadata__".
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise TextConditioningError(f"{source}: not a readable safetensors file ({err}); run precompute "
                                    "again to rewrite it") from err
    if metadata.get("schema") != SCHEMA:
        raise TextConditioningError(f"{source}: schema {metadata.get('schema')!r}, this version reads {SCHEMA!r}")
    missing = {"null.text", "null.mask"} - tensors.keys()
    if missing:
        raise TextConditioningError(f"{source}: missing tensors {sorted(missing)}")
    prompts = json.loads(metadata.get("prompts", "[]"))
    return TextConditioning(
        null_text=tensors["null.text"].float(),
        null_mask=tensors["null.mask"].bool(),
        prompts=prompts,
        prompt_text=tensors["prompts.text"].float() if prompts else None,
        prompt_mask=tensors["prompts.mask"].bool() if prompts else None,
        text_encoder=json.loads(metadata.get("text_encoder", "null")),
    )


def write_text_conditioning(folder: str | Path, conditioning: TextConditioning) -> str | Path:
    """Write <folder>/text_conditioning.safetensors atomically (a local folder or a bucket); returns its path."""
    target = storage.join(folder, FILE_NAME) if storage.is_remote(folder) else Path(folder) / FILE_NAME
    storage.put_bytes(to_bytes(conditioning), target)  # local: temporary file, fsync, rename
    return target


def read_text_conditioning(folder: str | Path) -> TextConditioning | None:
    """The stored conditioning of a latent folder, or None when precompute stored none (older outputs)."""
    if storage.is_remote(folder):
        uri = storage.join(folder, FILE_NAME)
        return from_bytes(storage.read_bytes(uri), source=storage.redact(uri)) if storage.exists(uri) else None
    path = Path(folder) / FILE_NAME
    if not path.is_file():
        return None
    return from_bytes(path.read_bytes(), source=str(path))
