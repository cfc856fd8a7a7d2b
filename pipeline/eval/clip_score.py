"""CLIP score: how well a video matches its prompt, by an open_clip model's image-text similarity.

    scorer = ClipScorer.load("/weights/open_clip-ViT-L-14")       # open_clip local-dir, hf-hub:org/repo,
    scores = scorer.score_videos(videos, prompts)                  #   or a checkpoint file + model_name
    # per video: 100 * max(cos(image(frame), text(prompt)), 0), mean over its frames

The definition is the usual one for text-to-image/video (Hessel et al. 2021, torchmetrics'
CLIPScore): cosine similarity of the L2-normalised embeddings, clipped at 0 and scaled by 100; a video's
score is the mean over its frames, a set's the mean over its videos. Frames go through the model's own
preprocessing (resize of the shortest side with its interpolation, centre crop, its mean and std), on
the 8-bit levels a viewer sees (videos are quantised to uint8 first, like the written MP4s).

The model loads like the CLIP text encoder of pipeline/data/text_clip.py (a local folder, an hf-hub id,
or a checkpoint with `model_name`); nothing is downloaded when the weights are local.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pipeline.data.encode.fingerprint import check_source, hash_config, hash_state_dict, load_error
from pipeline.data.encode.text_clip import CLIP_CONFIG_FILE


def quantize(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> the same range on uint8 levels (what an 8-bit video file holds)."""
    return torch.round((video.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


class ClipScorer:
    """An open_clip model (image and text towers) and its preprocessing."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, source: str, device: torch.device):
        self.model, self.tokenizer, self.source, self.device = model, tokenizer, source, device
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        size = cfg.get("size", model.visual.image_size)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=device)
        self.std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), device=device)
        self.interpolation = cfg.get("interpolation", "bicubic")
        self._fingerprint: dict | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, *, model_name: str | None = None,
             device: str | torch.device = "cpu") -> ClipScorer:
        """From an open_clip local-dir (open_clip_config.json + weights), `hf-hub:org/repo`, or a
        checkpoint file / pretrained tag with `model_name` (e.g. "ViT-L-14")."""
        import open_clip

        text = os.fspath(path)
        if text.startswith("hf-hub:"):
            model_id, pretrained, source = text, None, text
        else:
            source = check_source(text, what="CLIP score model")
            if os.path.isdir(source):
                if not os.path.isfile(os.path.join(source, CLIP_CONFIG_FILE)):
                    raise FileNotFoundError(f"CLIP score model: folder {source} has no {CLIP_CONFIG_FILE}; give an "
                                            "open_clip local-dir, an hf-hub: id, or a checkpoint with --clip-model-name")
                model_id, pretrained = f"local-dir:{source}", None
            elif not model_name:
                raise ValueError(f"CLIP score model: {source!r} is a checkpoint file or pretrained tag; also give its "
                                 "architecture (--clip-model-name, e.g. ViT-L-14)")
            else:
                model_id, pretrained = model_name, source
        try:
            model = open_clip.create_model(model_id, pretrained=pretrained, require_pretrained=True, device=device)
            tokenizer = open_clip.get_tokenizer(model_id)
        except (OSError, RuntimeError, ValueError) as err:
            raise load_error("CLIP score model", source, err) from err
        model.eval().requires_grad_(False)
        return cls(model, tokenizer, source=source, device=torch.device(device))

    def fingerprint(self) -> dict:
        """{"model": sha256 of the weights and image settings, "image_size"}: the protocol's CLIP part."""
        if self._fingerprint is None:
            settings = {"image_size": list(self.image_size), "mean": self.mean.tolist(), "std": self.std.tolist(),
                        "interpolation": self.interpolation}
            self._fingerprint = {"model": hash_config({"weights": hash_state_dict(self.model), **settings}),
                                 "image_size": list(self.image_size), "source": self.source}
        return self._fingerprint

    def preprocess(self, frames: torch.Tensor, *, to_8bit: bool = True) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 3, h, w) normalised model input (shortest side resized, centre crop).

        to_8bit=False skips the rounding to 8-bit levels (differentiable, for building test inputs)."""
        x = ((quantize(frames.float()) if to_8bit else frames.float()) + 1) / 2  # (N, 3, H, W) in [0, 1]
        height, width = x.shape[-2:]
        out_h, out_w = self.image_size
        scale = max(out_h / height, out_w / width)
        size = (max(out_h, round(height * scale)), max(out_w, round(width * scale)))
        mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - out_h) // 2, (size[1] - out_w) // 2
        x = x[..., top:top + out_h, left:left + out_w]  # (N, 3, h, w)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """(P, E) L2-normalised text embeddings."""
        tokens = self.tokenizer(prompts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, E) L2-normalised image embeddings."""
        return F.normalize(self.model.encode_image(self.preprocess(frames.to(self.device))).float(), dim=-1)

    def score_videos(self, videos: list[torch.Tensor], prompts: list[str], *,
                     frames_per_batch: int = 64) -> list[float]:
        """CLIP score of each video (3, T, H, W) in [-1, 1] against its prompt (mean over frames)."""
        if len(videos) != len(prompts):
            raise ValueError(f"score_videos: {len(videos)} videos but {len(prompts)} prompts")
        text = self.text_features(list(prompts)) if prompts else None  # (V, E)
        out = []
        for i, video in enumerate(videos):
            frames = video.transpose(0, 1)  # (T, 3, H, W)
            sims = torch.cat([self.image_features(frames[j:j + frames_per_batch])
                              for j in range(0, frames.shape[0], frames_per_batch)])  # (T, E)
            out.append(float((100 * (sims @ text[i])).clamp_min(0).mean()))
        return out


def validation_clip_score(validation, videos: list[torch.Tensor], captions: list[str], *, device,
                          cache: dict) -> float | None:
    """Mean CLIP score of validation videos when `validation.clip_model` is set (else None).

    `cache` keeps the loaded scorer between validations (the trainer's validator owns it).
    """
    if not getattr(validation, "clip_model", "") or not videos:
        return None
    if "scorer" not in cache:
        cache["scorer"] = ClipScorer.load(validation.clip_model, model_name=validation.clip_model_name or None,
                                          device=device)
    scores = cache["scorer"].score_videos(videos, captions)
    return sum(scores) / len(scores)
