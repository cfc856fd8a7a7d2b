"""Text conditioning the trainer needs besides the data set's captions: the null caption (caption dropout
and classifier-free guidance) and the validation captions.

No training rank loads a text encoder (T5-XXL is about 10 GB of GPU memory beside the model): precompute
stores the embeddings next to the latents (<latents>/text_conditioning.safetensors, pipeline/data/store/
text_conditioning.py). Rank 0 reads them once and saves what the run uses to
<output_dir>/conditioning.safetensors (a resume reuses the file); every rank receives them by broadcast.
- The null caption is the stored encoding of "".
- Validation samples `validation.prompts` (each must be among the stored prompts: precompute
  `--validation-prompts FILE`), else the stored prompts, else the captions of the first data-set
  samples (their embeddings are in the shards).
- Latents from an older precompute (no file): the null caption is the empty context (one masked
  token; PoM reads a zero state from it) and explicit `validation.prompts` fail with a clear error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ConfigError, RunConfig
from pipeline.train.distributed import broadcast_tensors

log = logging.getLogger(__name__)
FILE_NAME = "conditioning.safetensors"


@dataclass(kw_only=True)
class Conditioning:
    null_text: torch.Tensor
    """(L0, D) the null caption's embedding."""
    null_mask: torch.Tensor
    """(L0,) bool."""
    val_text: torch.Tensor
    """(P, L, D) validation captions."""
    val_mask: torch.Tensor
    """(P, L) bool."""
    val_shapes: list[tuple[int, int, int, int]]
    """Latent shape (C, T, H, W) to sample for each validation caption."""
    val_captions: list[str]
    """The captions, for file names and MLflow."""


def _pad_stack(texts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(1, max(t.shape[0] for t in texts))
    out = torch.zeros(len(texts), length, texts[0].shape[1])
    mask = torch.zeros(len(texts), length, dtype=torch.bool)
    for i, t in enumerate(texts):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def _compute(config: RunConfig, dataset) -> dict:
    """Rank 0: the tensors and captions (see the module docstring). Reads files only: no text encoder."""
    from pipeline.data.store.text_conditioning import FILE_NAME as STORED
    from pipeline.data.store.text_conditioning import read_text_conditioning

    prompts = list(config.validation.prompts)
    first_bucket_shape = tuple(int(v) for v in dataset.manifest["buckets"][0]["latent_shape"])
    stored = read_text_conditioning(dataset.root)
    if stored is None:
        if prompts:
            raise ConfigError(
                f"validation.prompts need their embeddings in {dataset.root}/{STORED}, and there is no such file "
                "(latents from an older precompute); run `pomvid precompute ... --validation-prompts FILE` with "
                "them, or leave validation.prompts empty to sample the captions of the first data-set samples")
        if dataset.manifest.get("text_encoder"):
            log.warning("%s/%s is missing (an older precompute): the null caption is the empty context, not the "
                        "encoded empty caption; re-run precompute to store it", dataset.root, STORED)
        dim = dataset[0]["text"].shape[1]
        null_text, null_mask = torch.zeros(1, dim), torch.zeros(1, dtype=torch.bool)
    else:
        null_text, null_mask = stored.null_text, stored.null_mask
        missing = [p for p in prompts if p not in stored.prompts]
        if missing:
            raise ConfigError(
                f"validation.prompts {missing[:3]} are not in {dataset.root}/{STORED} (it holds {len(stored.prompts)} "
                "prompts); re-run `pomvid precompute ... --validation-prompts FILE` with them")
        prompts = prompts or list(stored.prompts)  # the precompute's validation prompts, when no others are asked
    if prompts:
        rows = [stored.prompts.index(p) for p in prompts]
        texts = [stored.prompt_text[i][stored.prompt_mask[i]] for i in rows]
        captions, shapes = prompts, [first_bucket_shape] * len(prompts)
    else:
        count = min(config.validation.num_samples, len(dataset))
        samples = [dataset[i] for i in range(count)]
        texts = [s["text"] for s in samples]
        captions, shapes = [s["caption"] for s in samples], [tuple(s["latent"].shape) for s in samples]
    val_text, val_mask = _pad_stack(texts)
    return {"null_text": null_text.float(), "null_mask": null_mask, "val_text": val_text, "val_mask": val_mask,
            "val_shapes": shapes, "val_captions": captions}


def load_or_compute(config: RunConfig, dataset, *, output_dir: Path, is_main: bool,
                    device: torch.device) -> Conditioning:
    """The run's conditioning on every rank (collective: every rank calls it)."""
    from safetensors.torch import load_file, save_file

    path = Path(output_dir) / FILE_NAME
    tensors = None
    meta: dict = {}
    if is_main:
        wanted = {"prompts": config.validation.prompts, "num_samples": config.validation.num_samples}
        if path.is_file() and path.with_suffix(".json").is_file():
            meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("request") == wanted:  # the same validation captions as the saved ones
            values = load_file(str(path))
        else:
            values = _compute(config, dataset)
            meta = {"val_shapes": values["val_shapes"], "val_captions": values["val_captions"], "request": wanted}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: values[k].float().contiguous() for k in ("null_text", "null_mask", "val_text", "val_mask")},
                      str(path))
            path.with_suffix(".json").write_text(json.dumps(meta))
        tensors = [values[k].float() for k in ("null_text", "null_mask", "val_text", "val_mask")]
        shapes = torch.tensor(meta["val_shapes"], dtype=torch.float32)
        tensors.append(shapes)
    got = broadcast_tensors(tensors, device=device)
    null_text, null_mask, val_text, val_mask, shapes = (t.cpu() for t in got)
    return Conditioning(
        null_text=null_text, null_mask=null_mask.bool(), val_text=val_text, val_mask=val_mask.bool(),
        val_shapes=[tuple(int(v) for v in row) for row in shapes.tolist()],
        val_captions=meta.get("val_captions", []),  # rank 0 only: it writes the videos
    )
