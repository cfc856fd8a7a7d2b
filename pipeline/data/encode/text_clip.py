"""CLIP text tower (open-clip-torch): per-token hidden states before pooling, plus the mask.

Sources: an open_clip local-dir (open_clip_config.json + weights, what ``save``/``make_tiny_clip``
write), an ``hf-hub:org/repo`` id, or ``model_name`` with a checkpoint file or pretrained tag; or a
model config dict for random weights. The tokenizer is open_clip's SimpleTokenizer, whose BPE
vocabulary ships inside the package, so it works offline.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

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

CLIP_CONFIG_FILE = "open_clip_config.json"
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"


def tiny_clip_config(*, width: int = 32, layers: int = 2, heads: int = 2, context_length: int = 32) -> dict:
    """A small open_clip CLIP config (the vocabulary must stay 49408: SimpleTokenizer's ids)."""
    return {
        "embed_dim": width,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width,
                     "heads": heads, "layers": layers},
    }


class _TextTower(nn.Module):
    """The text half of a CLIP model; the vision tower is dropped to save memory."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self.token_embedding = owner.token_embedding
        self.positional_embedding = owner.positional_embedding
        self.transformer = owner.transformer
        self.ln_final = owner.ln_final
        self.register_buffer("attn_mask", owner.attn_mask, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.token_embedding(ids)  # (B, L, D)
        x = x + self.positional_embedding[:length].to(x.dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length].to(x.dtype)
        x = self.transformer(x, attn_mask=mask)  # (B, L, D), causal: token i sees tokens <= i
        return self.ln_final(x)  # (B, L, D)


def _text_tower(model: nn.Module, where: str) -> _TextTower:
    from open_clip.transformer import TextTransformer

    text = getattr(model, "text", None)
    if text is None and hasattr(model, "token_embedding"):
        return _TextTower(model)  # CLIP: the text tower's modules sit on the model itself
    if isinstance(text, TextTransformer) and text.cls_emb is None and not text.use_pad_mask:
        return _TextTower(text)
    raise ValueError(
        f"clip text encoder: {where} has a text tower of type {type(text).__name__} (CLS token, pad mask or "
        "a Hugging Face text model); only standard causal CLIP text transformers are supported"
    )


class ClipTextEncoder(TextEncoder):
    kind = "clip"

    def __init__(self, path: str | os.PathLike | None = None, *, config: dict | None = None,
                 model_name: str | None = None, max_length: int | None = None,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32, seed: int = 0):
        import open_clip

        if (path is None) == (config is None):
            raise ValueError("clip text encoder: give exactly one of path= (pretrained) or config= (random weights)")
        self.source, self.model_name, self.config, self.seed = None, model_name, None, None
        if config is not None:
            self.config = jsonable(config)
            self.seed = seed
            model = _model_from_config(self.config, seed)
            where = "config"
        else:
            model, where = self._load(open_clip, path, model_name)
        self.tower = _text_tower(model, where)
        self._full_model = model if config is not None else None  # kept only to save random weights
        self.tower.to(device=device, dtype=parse_dtype(dtype)).eval().requires_grad_(False)
        context = self.tower.positional_embedding.shape[0]
        if max_length is not None and not (isinstance(max_length, int) and 2 <= max_length <= context):
            raise ValueError(f"clip text encoder: max_length={max_length!r} must be in [2, {context}] "
                             "(the model's context length)")
        self._max_length = max_length or context
        model_cfg = self.config if config is not None else open_clip.get_model_config(self._model_id)
        hf_tokenizer = ((model_cfg or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
        if hf_tokenizer:
            raise ValueError(f"clip text encoder: {where} uses the Hugging Face tokenizer {hf_tokenizer!r}; "
                             "only open_clip's SimpleTokenizer (CLIP BPE) is supported")
        self.tokenizer = _simple_tokenizer()
        self._weights_hash: str | None = None

    def _load(self, open_clip, path, model_name):
        text = os.fspath(path)
        if text.startswith("hf-hub:"):
            self._model_id = self.source = text
        else:
            source = check_source(text, what="clip text encoder")
            self.source = source
            if os.path.isdir(source):
                if not os.path.isfile(os.path.join(source, CLIP_CONFIG_FILE)):
                    raise FileNotFoundError(f"clip text encoder: folder {source} has no {CLIP_CONFIG_FILE}; "
                                            "save one with ClipTextEncoder.save or make_tiny_clip")
                self._model_id = f"local-dir:{source}"
            else:
                if not model_name:
                    raise ValueError(f"clip text encoder: path={source!r} is a checkpoint or pretrained tag; "
                                     "also give model_name= (e.g. 'ViT-L-14')")
                self._model_id = model_name
        try:
            pretrained = None if self._model_id.startswith(("local-dir:", "hf-hub:")) else self.source
            model = open_clip.create_model(self._model_id, pretrained=pretrained, require_pretrained=True)
        except (OSError, RuntimeError, ValueError) as err:
            raise load_error("clip text encoder", self.source, err) from err
        return model, self.source

    @property
    def dim(self) -> int:
        return int(self.tower.ln_final.weight.shape[0])

    @property
    def max_length(self) -> int:
        return self._max_length

    def _encode(self, captions):
        device = self.tower.token_embedding.weight.device
        ids = self.tokenizer(captions, context_length=self.max_length).to(device)  # (B, L): sot, tokens, eot, 0s
        length = ids.shape[1]
        eot = (ids == self.tokenizer.eot_token_id).int().argmax(dim=1)  # (B,)
        # Keep everything up to the end-of-text token; id 0 is a real token ("!"), so not ids != 0.
        mask = torch.arange(length, device=device)[None] <= eot[:, None]  # (B, L)
        return self.tower(ids), mask

    def token_counts(self, captions: list[str]) -> list[int]:
        return [len(self.tokenizer.encode(c)) + 2 for c in captions]  # + start and end of text

    def fingerprint(self) -> dict:
        if self._weights_hash is None:
            self._weights_hash = hash_state_dict(self.tower)
        shapes = {k: list(v.shape) for k, v in self.tower.state_dict().items()}
        return {
            "kind": self.kind, "source": self.source, "model_name": self.model_name, "seed": self.seed,
            "config": self.config, "max_length": self.max_length, "dim": self.dim,
            "config_hash": hash_config({"shapes": shapes, "causal": self.tower.attn_mask is not None}),
            "weights_hash": self._weights_hash, "tokenizer_hash": _vocab_hash(),
            "dtype": dtype_name(self.tower.token_embedding.weight.dtype),
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write an open_clip local-dir (random-weight models only; pretrained ones have a source)."""
        from safetensors.torch import save_file

        if self._full_model is None:
            raise ValueError(f"clip text encoder: already stored at {self.source}; nothing to save")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CLIP_CONFIG_FILE).write_text(json.dumps({"model_cfg": self.config, "preprocess_cfg": {}}))
        state = {k: v.detach().cpu().contiguous() for k, v in self._full_model.state_dict().items()}
        save_file(state, str(folder / CLIP_WEIGHTS_FILE))
        self.source = str(folder.resolve())
        self._model_id = f"local-dir:{self.source}"
        return folder


@functools.lru_cache(maxsize=1)
def _simple_tokenizer():
    """One shared CLIP BPE tokenizer (stateless apart from its cache); its vocabulary ships with open_clip."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@functools.lru_cache(maxsize=1)
def _vocab_hash() -> str:
    tokenizer = _simple_tokenizer()
    lines = "\n".join(f"{token}\t{index}" for token, index in sorted(tokenizer.encoder.items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{lines}".encode()).hexdigest()


def _model_from_config(config: dict, seed: int) -> nn.Module:
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = dict(config)
    cls = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
    try:
        with torch.random.fork_rng(devices=[]):  # random weights from `seed`, global RNG untouched
            torch.manual_seed(seed)
            return cls(**cfg)
    except (TypeError, KeyError) as err:
        raise ValueError(f"clip text encoder: invalid open_clip config {config}: {err}") from err


def make_tiny_clip(folder: str | os.PathLike, *, width: int = 32, layers: int = 2, heads: int = 2,
                   context_length: int = 32, seed: int = 0) -> Path:
    """Save a random-weight tiny CLIP to ``folder``; load it with build_text_encoder("clip", path=folder)."""
    config = tiny_clip_config(width=width, layers=layers, heads=heads, context_length=context_length)
    return ClipTextEncoder(config=config, seed=seed).save(folder)
