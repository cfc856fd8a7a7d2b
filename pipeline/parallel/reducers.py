"""The sequence-parallel StateReducer: what a self-PoM's `reduce` becomes when its tokens are sharded.

Each SP rank aggregates the state of its own token-frames; the reducer combines them:

- bidirectional: one all-reduce (SUM) of (sum, count) packed into one (B, S + 1) tensor; backward
  all-reduces the gradient of that packed tensor (the count's part of the gradient travels along, so
  each direction moves exactly B * (S + 1) numbers: 2 * B * (S + 1) * bytes per element per step);
- block-causal: the local inclusive prefix over this rank's frames, plus the totals of all lower
  ranks (one all-gather of the (B, S + 1) totals; backward: the mirrored suffix, one all-gather).

Neither depends on the number of tokens. Cross-PoM keeps the single-device reducer: its context (the
text) is replicated on every SP rank.
"""

from __future__ import annotations

import torch

from pipeline.models.pom import PoMState, StateReducer
from pipeline.parallel.collectives import CommCounter, all_reduce_sum, sum_of_lower_ranks


def _pack(state: PoMState) -> torch.Tensor:
    # One message instead of two: (…, S) and (…, 1) -> (…, S + 1). The count carries no gradient of
    # its own (it comes from the mask), but packing keeps one collective per direction.
    return torch.cat([state.sum, state.count.to(state.sum.dtype)], dim=-1)


def _unpack(packed: torch.Tensor) -> PoMState:
    return PoMState(packed[..., :-1], packed[..., -1:])


class SequenceParallelReducer(StateReducer):
    """Reduces a self-PoM's state over the ranks of one sequence-parallel group.

    Rank order in the group is token-frame order: SP rank r holds the r-th contiguous slice.
    """

    def __init__(self, group, *, counter: CommCounter | None = None, layer: str = ""):
        self.group = group
        """Process group of the SP ranks sharing the sample (ParallelDims.sp_group)."""
        self.counter = counter
        """Where every collective's bytes are recorded (None: not counted)."""
        self.layer = layer
        """Name of the layer in the counter's records, e.g. "blocks.0.self_pom"."""

    # torch.compile: not traced, on purpose (pipeline/models/compile.py). The graph of the block splits
    # here; the collective, its counter records and its mirrored backward run eagerly, as uncompiled.
    @torch.compiler.disable
    def reduce(self, state: PoMState) -> PoMState:
        packed = _pack(state)  # (B, S + 1), this rank's tokens only
        total = all_reduce_sum(packed, self.group, counter=self.counter, layer=self.layer)  # (B, S + 1)
        return _unpack(total)

    @torch.compiler.disable
    def reduce_causal(self, frame_state: PoMState) -> PoMState:
        packed = _pack(frame_state)  # (B, F_local, S + 1), per local frame
        local_prefix = packed.cumsum(dim=1)  # (B, F_local, S + 1): frames of this rank up to f
        rank_total = local_prefix[:, -1]  # (B, S + 1): all frames of this rank
        lower = sum_of_lower_ranks(rank_total, self.group, counter=self.counter, layer=self.layer)
        return _unpack(local_prefix + lower.unsqueeze(1))  # (B, F_local, S + 1): global inclusive prefix

    def __deepcopy__(self, memo) -> SequenceParallelReducer:
        # A copy of the model (e.g. its EMA) shares the process group and the counter: process groups
        # cannot be copied, and the copy's collectives belong to the same run.
        return SequenceParallelReducer(self.group, counter=self.counter, layer=self.layer)

    def __repr__(self) -> str:
        return f"SequenceParallelReducer(layer={self.layer!r})"
