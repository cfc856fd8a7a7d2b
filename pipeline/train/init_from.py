"""`train.init_from`: start a new run from other weights (fine-tuning, a higher resolution or more frames,
weights brought in from elsewhere).

PATH may be
- a run folder, its checkpoints/ folder or one step_XXXXXXXX folder: the checkpoint's EMA weights
  (ema.safetensors), else its model weights (DeepSpeed's fp32 masters, gathered from any ZeRO stage);
- an export folder (`pomvid export`): its model.safetensors;
- a .safetensors file of PoM DiT tensors by parameter name.

Every tensor of the model must be there with the model's shape; a tensor missing, left over or of
another shape is an error naming the tensors (e.g. the patch embedding when the latent channels
change). Position embeddings are not tensors of the model: they are computed from the token grid of
each batch (sin-cos over frames, height, width), so another frame count or resolution needs nothing.
The weights are copied into the model before DeepSpeed builds its fp32 masters and the EMA, so both
start from them. A resumed run ignores init_from: its checkpoint has the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError

log = logging.getLogger("pomvid.train")


def read_init_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors at `path` (see the module docstring) and a description of where they came from."""
    from safetensors.torch import load_file

    from pipeline.export import WEIGHTS_FILE, is_export
    from pipeline.generate import SampleError, resolve_checkpoint
    from pipeline.train import checkpoint as ckpt

    source = Path(path)
    if source.is_file():
        if source.suffix != ".safetensors":
            raise ConfigError(f"train.init_from={path}: a file must be .safetensors (tensors by parameter name)")
        return load_file(str(source)), f"{source}"
    if not source.exists():
        raise ConfigError(f"train.init_from={path}: no such file or folder")
    if is_export(source):
        return load_file(str(source / WEIGHTS_FILE)), f"export {source}"
    try:
        folder = resolve_checkpoint(source)
    except SampleError as err:
        raise ConfigError(f"train.init_from={path}: {err}") from None
    ema = ckpt.load_ema(folder)
    if ema is not None:
        return ema, f"EMA weights of {folder}"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=ckpt.DS_TAG), f"model weights of {folder}"


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(param.ds_shape) if hasattr(param, "ds_id") else tuple(param.shape)


def check_init_weights(model: nn.Module, weights: dict[str, torch.Tensor], *, source: str) -> None:
    """ConfigError naming every tensor that is missing, left over or of another shape."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    shapes = [f"{name} {tuple(weights[name].shape)} vs the model's {_shape(p)}" for name, p in params.items()
              if name in weights and tuple(weights[name].shape) != _shape(p)]
    problems = []
    if shapes:
        problems.append(f"other shapes: {'; '.join(shapes)}")
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if unexpected:
        problems.append(f"not in the model: {', '.join(unexpected)}")
    if problems:
        raise ConfigError(f"train.init_from: the {source} do not fit the model ({' | '.join(problems)}); set the "
                          "model fields (--set model.width=... model.in_channels=...) to those of the source run")


@torch.no_grad()
def load_init_weights(model: nn.Module, path: str) -> str:
    """Copy the weights at `path` into `model` (ZeRO-3 partitioned or not); returns their description."""
    weights, source = read_init_weights(path)
    check_init_weights(model, weights, source=source)
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id"):  # ZeRO-3: whole on every rank for the copy, rank 0's kept
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(weights[name].to(param.dtype))
        else:
            param.data.copy_(weights[name].to(param.dtype))
    return source
