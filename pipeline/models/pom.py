"""The Polynomial Mixer (PoM), a linear-cost replacement for multi-head attention.

For queries X (B, N, D) and context C (B, M, D) (C = X when self-mixing):

    h_j = poly(W_h c_j)                      # (k * e * D) polynomial features of each context token
    S   = sum_j m_j h_j,  n = sum_j m_j      # the state: a fixed-size sum and a count (m = mask)
    out_i = W_o(gate(W_s x_i) * S / n)       # every query selects from the mean state

The layer is written as aggregate -> reduce -> select. `reduce` is where the state of all tokens is
combined; on one device it is the identity (bidirectional) or a prefix sum over frames (block-causal).
Sequence parallelism swaps `self.reducer` for a collective version from the outside
(pipeline/parallel), so this file never knows about process groups.

Two formulations:
- "v1", the paper's: gelu(W_h c) split into `degree` chunks a_1..a_k, poly = [a_1, a_1 a_2, ...,
  a_1...a_k] (cumulative products), sigmoid gate.
- "v2", the authors' later one: z = clamp(leaky_relu(W_h c)), poly = [w_1 z, w_2 z^2, ..., w_k z^k]
  with learned per-channel coefficients w_p, hard-sigmoid gate. Its state is also a mean.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("v1", "v2")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The state is accumulated in at least float32: in bf16 a sum over 100k tokens loses most of its
    digits and counts above 256 are not even representable. The state is tiny (B x S), so this costs
    nothing measurable, also on the wire under sequence parallelism."""
    return torch.promote_types(dtype, torch.float32)


class PoMState(NamedTuple):
    """The fixed-size state of a PoM layer: a masked sum of polynomial features and a token count.

    Bidirectional: sum (B, S), count (B, 1). Per frame: sum (B, F, S), count (B, F, 1).
    """

    sum: torch.Tensor
    count: torch.Tensor


class StateReducer:
    """Combines local states into the state the queries read. The single-device version.

    Sequence parallelism replaces a self-mixing PoM's reducer with one whose `reduce` all-reduces over
    the sequence-parallel group and whose `reduce_causal` adds the totals of lower ranks.
    """

    def reduce(self, state: PoMState) -> PoMState:
        return state

    def reduce_causal(self, frame_state: PoMState) -> PoMState:
        # Inclusive prefix over frames: frame f reads the frames 0..f.
        return PoMState(frame_state.sum.cumsum(dim=1), frame_state.count.cumsum(dim=1))


class PoM(nn.Module):
    """Polynomial Mixer with `degree` polynomial orders and an expansion factor `expand`.

    The state has `state_dim = degree * expand * dim` numbers (plus one count) per sample, whatever
    the number of tokens.
    """

    def __init__(self, dim: int, degree: int = 2, expand: int = 2, variant: str = "v1"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"PoM variant={variant!r} is unknown; use one of {VARIANTS}")
        if degree < 1 or expand < 1 or dim < 1:
            raise ValueError(f"PoM needs dim, degree and expand >= 1, got {dim=}, {degree=}, {expand=}")
        self.dim, self.degree, self.expand, self.variant = dim, degree, expand, variant
        self.hidden = expand * dim
        self.state_dim = degree * self.hidden
        if variant == "v1":
            self.to_features = nn.Linear(dim, self.state_dim)
        else:
            self.to_features = nn.Linear(dim, self.hidden)
            # Coefficient of z^p per channel; 1/p! keeps high powers from dominating at init.
            init = torch.tensor([1.0 / torch.arange(1, p + 1).prod().item() for p in range(1, degree + 1)])
            self.coefficients = nn.Parameter(init[:, None].repeat(1, self.hidden))  # (k, e*D)
        self.to_gate = nn.Linear(dim, self.state_dim)
        self.to_out = nn.Linear(self.state_dim, dim)
        self.reducer = StateReducer()

    # -- the three stages ---------------------------------------------------------------------------

    def features(self, context: torch.Tensor) -> torch.Tensor:
        """Polynomial features h_j of every context token: (B, M, D) -> (B, M, S)."""
        if self.variant == "v1":
            chunks = F.gelu(self.to_features(context)).chunk(self.degree, dim=-1)  # k x (B, M, e*D)
            products, running = [], None
            for chunk in chunks:
                running = chunk if running is None else running * chunk
                products.append(running)
            return torch.cat(products, dim=-1)
        z = F.leaky_relu(self.to_features(context), negative_slope=0.1).clamp(-2.0, 2.0)  # (B, M, e*D)
        powers, running = [], None
        for p in range(self.degree):
            running = z if running is None else running * z
            powers.append(running * self.coefficients[p])
        return torch.cat(powers, dim=-1)

    def aggregate(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> PoMState:
        """Masked sum and count of the features over all context tokens: state (B, S), (B, 1)."""
        h = self.features(context)  # (B, M, S)
        dtype = state_dtype(h.dtype)
        if mask is None:
            count = torch.full((h.shape[0], 1), h.shape[1], dtype=dtype, device=h.device)
            return PoMState(h.sum(dim=1, dtype=dtype), count)
        weights = mask.to(h.dtype).unsqueeze(-1)  # (B, M, 1)
        return PoMState((h * weights).sum(dim=1, dtype=dtype), weights.sum(dim=1, dtype=dtype))

    def aggregate_frames(self, x: torch.Tensor, frame_tokens: int, mask: torch.Tensor | None) -> PoMState:
        """Per-frame sums over consecutive frames of `frame_tokens` tokens: (B, F, S), (B, F, 1)."""
        batch, tokens, _ = x.shape
        if tokens % frame_tokens:
            raise ValueError(f"{tokens} tokens do not split into frames of frame_tokens={frame_tokens}")
        frames = tokens // frame_tokens
        h = self.features(x).view(batch, frames, frame_tokens, self.state_dim)  # (B, F, T, S)
        dtype = state_dtype(h.dtype)
        if mask is None:
            count = torch.full((batch, frames, 1), frame_tokens, dtype=dtype, device=h.device)
            return PoMState(h.sum(dim=2, dtype=dtype), count)
        weights = mask.to(h.dtype).view(batch, frames, frame_tokens, 1)
        return PoMState((h * weights).sum(dim=2, dtype=dtype), weights.sum(dim=2, dtype=dtype))

    def select(self, x: torch.Tensor, mean_state: torch.Tensor) -> torch.Tensor:
        """Gate the mean state by each query and project back: x (..., N, D), mean (..., N or 1, S)."""
        gate = self.to_gate(x)  # (B, N, S)
        gate = torch.sigmoid(gate) if self.variant == "v1" else F.hardsigmoid(gate)
        return self.to_out(gate * mean_state.to(gate.dtype))  # (B, N, D)

    # -- entry points ---------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        frame_tokens: int | None = None,
    ) -> torch.Tensor:
        """Mix x (B, N, D) with `context` (B, M, D), or with itself when context is None.

        context_mask (B, M) bool, True = valid; when self-mixing it masks x's own tokens out of the
        state (padded frames). frame_tokens=F: block-causal self-mixing over frames of F tokens.
        """
        if context is None:
            if frame_tokens is not None:
                frame_state = self.aggregate_frames(x, frame_tokens, context_mask)
                prefix = self.reducer.reduce_causal(frame_state)  # (B, F, S), (B, F, 1)
                mean = prefix.sum / prefix.count.clamp_min(1.0)  # (B, F, S)
                # Broadcast each frame's mean over its tokens instead of repeating it: a repeated
                # (B, N, S) copy would also be saved for backward, 4x the size of x at expand 2.
                batch, tokens, dim = x.shape
                frames = x.reshape(batch, tokens // frame_tokens, frame_tokens, dim)  # (B, F, T, D)
                return self.select(frames, mean.unsqueeze(2)).reshape(batch, tokens, dim)
            state = self.reducer.reduce(self.aggregate(x, context_mask))
        else:
            if frame_tokens is not None:
                raise ValueError("frame_tokens (block-causal) applies to self-mixing only; got a context")
            state = self.aggregate(context, context_mask)
        mean = state.sum / state.count.clamp_min(1.0)  # (B, S)
        return self.select(x, mean.unsqueeze(1))

    def step(
        self, x: torch.Tensor, state: PoMState | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, PoMState]:
        """Frame-sequential inference: mix the current frame's tokens x (B, T, D) given the cached
        state of the earlier frames, and return (output, state including this frame).

        The caller decides whether to keep the returned state (for example only once the frame is
        fully denoised), so memory stays constant however long the video grows.
        """
        local = self.aggregate(x, mask)
        if state is not None:
            local = PoMState(state.sum + local.sum, state.count + local.count)
        mean = local.sum / local.count.clamp_min(1.0)  # (B, S)
        return self.select(x, mean.unsqueeze(1)), local

    def empty_state(self, batch: int, device=None, dtype=torch.float32) -> PoMState:
        """The state of no tokens, to start frame-sequential generation."""
        dtype = state_dtype(dtype)
        return PoMState(
            torch.zeros(batch, self.state_dim, device=device, dtype=dtype),
            torch.zeros(batch, 1, device=device, dtype=dtype),
        )
