"""Text encoders: the interface. T5 (transformers + sentencepiece) is in text_t5.py, the CLIP text
tower in text_clip.py, ``text_factory.build_text_encoder`` builds either.

``encode(captions) -> (emb (B, L, D) float32, mask (B, L) bool)`` with L = max_length; padded
positions are zeroed. The empty caption "" is the null caption for classifier-free guidance and
encodes like any other (its mask keeps the end-of-text token).

Kinds for ``build_text_encoder``: "t5", "clip".
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class TextEncoder(ABC):
    kind: str = ""

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @property
    @abstractmethod
    def max_length(self) -> int: ...

    @abstractmethod
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def fingerprint(self) -> dict: ...

    @abstractmethod
    def token_counts(self, captions: list[str]) -> list[int]:
        """Tokens of each caption before truncation (special tokens included): a caption with more
        than max_length is cut by encode(), and precompute counts it."""

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """list of B captions -> (emb (B, L, D) float32, mask (B, L) bool), on the encoder's device."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"{self.kind} text encoder: captions must be a list of str, got {captions!r:.80}")
        if not captions:
            raise ValueError(f"{self.kind} text encoder: captions is empty; give at least one caption")
        emb, mask = self._encode(list(captions))  # (B, L, D), (B, L)
        # zero the padding so cached embeddings do not depend on what the model writes there
        return emb.float() * mask[..., None], mask
