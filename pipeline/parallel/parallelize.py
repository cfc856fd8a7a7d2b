"""`parallelize_pom_dit`: sequence parallelism applied to a single-device PoM DiT from the outside.

The model code (pipeline/models) never knows about process groups. Everything SP changes in the
model is here, in one function, in a fixed order (torchtitan's `parallelize_*`). The inputs side
(sharding the latents, the frame mask and the frame offset) is `shard_batch` below; the loss side is
pipeline/parallel/loss.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models.pom import PoM, StateReducer
from pipeline.parallel.collectives import CommCounter
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.reducers import SequenceParallelReducer
from pipeline.parallel.sharding import FrameShard, shard_latents

_MARK = "_pomvid_sequence_parallel"


class _Applied:
    """What parallelize_pom_dit left on the model; shared (not copied) by deepcopy, like the groups."""

    def __init__(self, dims: ParallelDims, counter: CommCounter):
        self.dims, self.counter = dims, counter

    def __deepcopy__(self, memo) -> _Applied:
        return self


def parallelize_pom_dit(model: nn.Module, dims: ParallelDims, *, counter: CommCounter | None = None) -> nn.Module:
    """Make `model` (a PoMDiT) run on this rank's slice of token-frames; returns the same model.

    After this, call the model with the local latents, `frame_mask` and `frame_offset` of a
    `FrameShard` (see `shard_batch`). `counter` records every collective (`comm_counter(model)`
    returns it; a new one is made when None). With dims.sp == 1 the model is left unchanged.
    """
    # 0. Checks: a PoM DiT, parallelized at most once (two reducers in a row would all-reduce twice).
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(getattr(b, "self_pom", None), PoM) for b in blocks):
        raise TypeError(f"parallelize_pom_dit needs a PoMDiT (model.blocks[i].self_pom), got {type(model).__name__}")
    if getattr(model, _MARK, None) is not None:
        raise RuntimeError("parallelize_pom_dit was already applied to this model")
    counter = counter if counter is not None else CommCounter()
    setattr(model, _MARK, _Applied(dims, counter))
    if not dims.sp_enabled:
        return model

    # 1. Self-PoM: the only place where tokens of different frames meet. Its reducer becomes the
    #    SP reducer: all-reduce of (sum, count) (bidirectional) or all-gather of rank totals
    #    (block-causal), each with its mirrored backward. One collective per layer per direction.
    group = dims.sp_group
    for i, block in enumerate(blocks):
        block.self_pom.reducer = SequenceParallelReducer(group, counter=counter, layer=f"blocks.{i}.self_pom")

    # 2. Cross-PoM: its context is the text, replicated on every SP rank; the local state is already
    #    the global one. Keep the single-device reducer (asserted, so a future change is noticed).
    for block in blocks:
        if type(block.cross_pom.reducer) is not StateReducer:
            raise RuntimeError("cross-PoM must keep the single-device reducer (its text is replicated)")

    # 3. Everything else (patch embedding, position embeddings, AdaLN, norms, FFN, final layer) is
    #    per token or per token-frame: nothing to change. Position embeddings get the global frame
    #    index through the `frame_offset` argument of forward.

    # 4. Data parallelism and gradient reduction are not applied here: DeepSpeed (or the trainer)
    #    owns them; the SP loss weighting and the factor they need are in pipeline/parallel/loss.py.
    return model


def comm_counter(model: nn.Module) -> CommCounter | None:
    """The CommCounter of a model prepared by `parallelize_pom_dit` (None if it was not)."""
    mark = getattr(model, _MARK, None)
    return None if mark is None else mark.counter


@dataclass(kw_only=True)
class LocalBatch:
    """One SP rank's part of a training batch, ready for `model(...)` and `sequence_parallel_loss`."""

    latents: torch.Tensor
    """(B, C, T_local, H, W) this rank's token-frames (zeros where padded)."""

    shard: FrameShard
    """Which token-frames these are: frame_mask, frame_offset, global masks."""

    timesteps: torch.Tensor | None = None
    """(B,) as given, or (B, F_local) when given per token-frame."""

    extras: dict[str, torch.Tensor] | None = None
    """Other (B, C, T, H, W) tensors sliced the same way (e.g. the flow target)."""


def shard_batch(latents: torch.Tensor, dims: ParallelDims, *, patch_t: int = 1,
                frame_mask: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                **extras: torch.Tensor) -> LocalBatch:
    """Slice a full batch (identical on every rank of the SP group) to this rank's token-frames.

    latents and every extra (B, C, T, H, W); frame_mask (B, T / patch_t) bool; timesteps (B,) or
    (B, T / patch_t). Raises when sp exceeds the number of token-frames.
    """
    local, shard = shard_latents(latents, sp_rank=dims.sp_rank, sp_size=dims.sp, patch_t=patch_t,
                                 frame_mask=frame_mask)
    if timesteps is not None and timesteps.dim() == 2 and timesteps.shape[1] != 1:
        timesteps = shard.shard(timesteps, dim=1)  # (B, F_local); padded frames get t = 0
    sliced = {name: shard.shard(x, dim=2, per_token_frame=patch_t) for name, x in extras.items()}
    return LocalBatch(latents=local, shard=shard, timesteps=timesteps, extras=sliced)
