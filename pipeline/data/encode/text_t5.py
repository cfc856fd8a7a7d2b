"""T5 text encoder (transformers + sentencepiece) from a folder or hub id, and a tiny one for tests."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from pipeline.data.encode.fingerprint import (
    check_source,
    dtype_name,
    hash_config,
    hash_state_dict,
    jsonable,
    load_error,
    parse_dtype,
)
from pipeline.data.encode.text import TextEncoder

T5_DEFAULT_MAX_LENGTH = 226  # CogVideoX's text length


class T5TextEncoder(TextEncoder):
    """transformers ``T5EncoderModel`` with its sentencepiece tokenizer, from a folder or hub id."""

    kind = "t5"

    def __init__(self, path: str | os.PathLike, *, max_length: int = T5_DEFAULT_MAX_LENGTH,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32,
                 subfolder: str | None = None, tokenizer_subfolder: str | None = None):
        from transformers import AutoTokenizer, T5EncoderModel

        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"t5 text encoder: max_length={max_length!r} must be a positive integer")
        source = check_source(path, what="t5 text encoder")
        # A diffusers pipeline folder (CogVideoX) keeps the two under text_encoder/ and tokenizer/.
        if os.path.isdir(os.path.join(source, "text_encoder")) and subfolder is None:
            subfolder, tokenizer_subfolder = "text_encoder", tokenizer_subfolder or "tokenizer"
        self.source, self.subfolder, self.tokenizer_subfolder = source, subfolder, tokenizer_subfolder
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, subfolder=tokenizer_subfolder or "")
            self.model = T5EncoderModel.from_pretrained(source, subfolder=subfolder or "",
                                                        dtype=parse_dtype(dtype))
        except (OSError, ValueError) as err:
            raise load_error("t5 text encoder", source, err) from err
        self.model.to(device).eval().requires_grad_(False)
        self._max_length = max_length
        self._weights_hash: str | None = None

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def max_length(self) -> int:
        return self._max_length

    def _encode(self, captions):
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt").to(self.model.device)
        mask = tokens.attention_mask.bool()  # (B, L)
        emb = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return emb, mask  # (B, L, D), (B, L)

    def token_counts(self, captions: list[str]) -> list[int]:
        if not captions:  # the tokenizer fails on an empty list
            return []
        ids = self.tokenizer(list(captions), truncation=False, verbose=False)["input_ids"]  # with </s>
        return [len(i) for i in ids]

    def fingerprint(self) -> dict:
        if self._weights_hash is None:
            self._weights_hash = hash_state_dict(self.model)
        config = jsonable(self.model.config.to_diff_dict())
        config.pop("transformers_version", None)
        config.pop("dtype", None)  # recorded below, from the weights actually held
        return {
            "kind": self.kind, "source": self.source, "subfolder": self.subfolder,
            "tokenizer_subfolder": self.tokenizer_subfolder, "max_length": self.max_length,
            "dim": self.dim, "config_hash": hash_config(config), "weights_hash": self._weights_hash,
            "tokenizer_hash": self._tokenizer_hash(),
            "dtype": dtype_name(self.model.dtype),
        }


    def _tokenizer_hash(self) -> str:
        spec = json.loads(self.tokenizer.backend_tokenizer.to_str())
        # padding/truncation are per-call state that encode() sets, not part of the vocabulary
        spec.pop("padding", None)
        spec.pop("truncation", None)
        return hash_config(spec)


def make_tiny_t5(folder: str | os.PathLike, captions: list[str], *, dim: int = 32, layers: int = 2,
                 heads: int = 2, vocab_size: int = 96, seed: int = 0) -> Path:
    """Train a sentencepiece model on ``captions`` and save it with a random-weight T5 encoder.

    The folder loads with ``build_text_encoder("t5", path=folder)``: the real T5 classes, no download.
    """
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    captions = [c for c in captions if c.strip()]
    if not captions:
        raise ValueError("make_tiny_t5: captions has no non-empty caption to train the tokenizer on")
    if dim % heads:
        raise ValueError(f"make_tiny_t5: dim={dim} must be divisible by heads={heads}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    # T5's id layout: pad 0, eos 1, unk 2, no bos. hard_vocab_limit=False: a few captions may not
    # hold vocab_size pieces. One thread keeps the trained model deterministic.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=proto, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(proto.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(folder, extra_ids=0)
    tokenizer.save_pretrained(folder)
    config = T5Config(vocab_size=len(tokenizer), d_model=dim, d_kv=dim // heads, d_ff=2 * dim,
                      num_layers=layers, num_heads=heads, relative_attention_num_buckets=8,
                      relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    model.save_pretrained(folder)
    return folder
