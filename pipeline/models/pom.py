"""The Polynomial Mixer (PoM), a linear-cost replacement for multi-head attention.

For queries X (B, N, D) and context C (B, M, D) (C = X when self-mixing):

    h_j = poly(W_c c_j)                      # polynomial features of each context token
    S   = sum_j m_j h_j,  n = sum_j m_j      # the state: a fixed-size sum and a count (m = mask)
    out_i = W_o(gate(W_s x_i) * S / n)       # every query selects from the mean state

The layer is written as aggregate -> reduce -> select. `reduce` is where the state of all tokens is
combined; on one device it is the identity (bidirectional) or a prefix sum over frames (block-causal).
Sequence parallelism swaps `self.reducer` for a collective version from the outside
(pipeline/parallel), so this file never knows about process groups.

Two formulations:
- "v1", the paper's: gelu(W_h c + b) split into `degree` chunks a_1..a_k, poly = [a_1, a_1 a_2, ...,
  a_1...a_k] (cumulative products, k*e*D wide), sigmoid gate, biases everywhere.
- "v2", the authors' `pom` package (2026): a = clamp(leaky_relu(W_c c, 0.01), -0.1, 6),
  poly = sum_p c_p a^p with a learned (e*D, k) coefficient matrix (e*D wide), gate
  hardsigmoid(W_s x + b_s) with `n_sel_heads` selection heads, W_o without bias by default.
  With n_groups = 1, W_c and W_s are one stacked matrix (`qc_proj`): self-mixing is one GEMM for
  both; with n_groups > 1, W_c is a grouped 1x1 projection (`po_proj`) and W_s a Linear (`se_proj`).
  Parameter names are the authors', so `PoM.from_authors_state_dict` loads their weights.

Backward keeps only x, the mask and the small state (pipeline/models/pom_math.py); `recompute=False`
runs the same math through plain autograd (the reference in the tests, the baseline in
benchmarks/pom_memory.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pipeline.models.pom_math import (
    Aggregate,
    MixSpec,
    Select,
    gate,
    masked_sum,
    polynomial,
    project,
    state_dtype,
)

VARIANTS = ("v1", "v2")
__all__ = ["VARIANTS", "PoM", "PoMState", "StateReducer", "state_dtype"]


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


def _count(mask: torch.Tensor | None, batch: int, tokens: int, frame_tokens: int | None, device) -> torch.Tensor:
    """Valid tokens per sample (B, 1) or per frame (B, F, 1); the mask carries no gradient."""
    dtype = torch.float32
    if frame_tokens is None:
        if mask is None:
            return torch.full((batch, 1), float(tokens), dtype=dtype, device=device)
        return mask.to(dtype).sum(dim=1, keepdim=True)
    frames = tokens // frame_tokens
    if mask is None:
        return torch.full((batch, frames, 1), float(frame_tokens), dtype=dtype, device=device)
    return mask.to(dtype).view(batch, frames, frame_tokens).sum(dim=2).unsqueeze(-1)


class PoM(nn.Module):
    """Polynomial Mixer of width `dim`, polynomial `degree` k and expansion `expand` e.

    The state has `state_dim` numbers (v1: k*e*D, v2: e*D) plus one count per sample, whatever the
    number of tokens. n_sel_heads, n_groups and bias are v2's (see the module docstring).
    """

    def __init__(self, dim: int, degree: int = 2, expand: int = 2, variant: str = "v1", *,
                 n_sel_heads: int = 1, n_groups: int = 1, bias: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"PoM variant={variant!r} is unknown; use one of {VARIANTS}")
        if degree < 1 or expand < 1 or dim < 1 or n_sel_heads < 0 or n_groups < 1:
            raise ValueError(f"PoM needs dim, degree, expand, n_groups >= 1 and n_sel_heads >= 0, got "
                             f"{dim=}, {degree=}, {expand=}, {n_groups=}, {n_sel_heads=}")
        if variant == "v1" and (n_sel_heads > 1 or n_groups > 1 or bias):
            raise ValueError("n_sel_heads, n_groups and bias are PoM v2's options; v1 (the paper's) has "
                             f"one gate per state channel and biases: got {n_sel_heads=}, {n_groups=}, {bias=}")
        self.dim, self.degree, self.expand, self.variant = dim, degree, expand, variant
        self.n_sel_heads, self.n_groups, self.bias = n_sel_heads, n_groups, bias
        self.hidden = expand * dim
        self.state_dim = degree * self.hidden if variant == "v1" else self.hidden
        heads = n_sel_heads if n_sel_heads > 1 else 1
        if self.state_dim % heads:
            raise ValueError(f"PoM n_sel_heads={n_sel_heads} must divide the state width e*D={self.state_dim}")
        if dim % n_groups:
            raise ValueError(f"PoM n_groups={n_groups} must divide dim={dim}")
        self.gate_dim = self.state_dim if heads == 1 else heads
        self.spec = MixSpec(variant=variant, degree=degree, features=self.state_dim if variant == "v1" else self.hidden,
                            groups=n_groups, heads=heads)
        if variant == "v1":
            self.to_features = nn.Linear(dim, self.state_dim)
            self.to_gate = nn.Linear(dim, self.state_dim)
            self.to_out = nn.Linear(self.state_dim, dim)
        else:
            if n_groups == 1:  # rows [0, e*D): W_c; rows [e*D, e*D + G): W_s (one GEMM when self-mixing)
                self.qc_proj = nn.Linear(dim, self.hidden + self.gate_dim, bias=False)
                self.se_bias = nn.Parameter(torch.zeros(self.gate_dim))
            else:
                self.po_proj = nn.Conv1d(dim, self.hidden, kernel_size=1, groups=n_groups, bias=bias)
                self.se_proj = nn.Linear(dim, self.gate_dim)
            coeff = torch.randn(self.hidden, degree).clamp(-0.001, 0.001)  # the authors' init
            self.po_coeff = nn.Parameter(coeff)  # (e*D, k)
            self.ag_proj = nn.Linear(self.hidden, dim, bias=bias)
        self.reducer = StateReducer()
        self.recompute = True
        """Keep only inputs for backward (pom_math's Functions); False: plain autograd, same math."""

    # -- parameters, as the Functions see them -----------------------------------------------------------

    def _feature_params(self, stacked: bool):
        """(weight, bias, coeff) of W_c; with `stacked`, W_s's rows follow W_c's in `weight`."""
        if self.variant == "v1":
            return self.to_features.weight, self.to_features.bias, None
        if self.n_groups > 1:
            return self.po_proj.weight, self.po_proj.bias, self.po_coeff
        weight = self.qc_proj.weight if stacked else self.qc_proj.weight[:self.hidden]
        return weight, None, self.po_coeff

    def _gate_params(self):
        if self.variant == "v1":
            return self.to_gate.weight, self.to_gate.bias
        if self.n_groups > 1:
            return self.se_proj.weight, self.se_proj.bias
        return self.qc_proj.weight[self.hidden:], self.se_bias

    def _out_params(self):
        out = self.to_out if self.variant == "v1" else self.ag_proj
        return out.weight, out.bias

    # -- the three stages ----------------------------------------------------------------------------------

    def features(self, context: torch.Tensor) -> torch.Tensor:
        """Polynomial features h_j of every context token: (B, M, D) -> (B, M, S). Plain autograd."""
        weight, bias, coeff = self._feature_params(stacked=False)
        return polynomial(project(context, weight, bias, self.n_groups), coeff, self.spec)

    def _aggregate(self, context, mask, frame_tokens, with_gate: bool):
        """(local state, raw gate of the same tokens or None). with_gate: v2's stacked GEMM."""
        stacked = with_gate and self.variant == "v2" and self.n_groups == 1
        weight, bias, coeff = self._feature_params(stacked)
        batch, tokens, _ = context.shape
        if frame_tokens is not None and tokens % frame_tokens:
            raise ValueError(f"{tokens} tokens do not split into frames of frame_tokens={frame_tokens}")
        weights = None if mask is None else mask.to(context.dtype)  # (B, M)
        count = _count(mask, batch, tokens, frame_tokens, context.device)
        if self.recompute:
            out = Aggregate.apply(context, weights, frame_tokens, self.spec, weight, bias, coeff)
            total, raw_gate = out if stacked else (out, None)
        else:
            y = project(context, weight, bias, self.n_groups)  # (B, M, R)
            total = masked_sum(polynomial(y[..., :self.spec.features], coeff, self.spec), weights, frame_tokens)
            raw_gate = y[..., self.spec.features:] if stacked else None
        return PoMState(total, count.to(total.dtype)), raw_gate

    def aggregate(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> PoMState:
        """Masked sum and count of the features over all context tokens: state (B, S), (B, 1)."""
        return self._aggregate(context, mask, None, with_gate=False)[0]

    def aggregate_frames(self, x: torch.Tensor, frame_tokens: int, mask: torch.Tensor | None) -> PoMState:
        """Per-frame sums over consecutive frames of `frame_tokens` tokens: (B, F, S), (B, F, 1)."""
        return self._aggregate(x, mask, frame_tokens, with_gate=False)[0]

    def select(self, x: torch.Tensor, mean_state: torch.Tensor, raw_gate: torch.Tensor | None = None) -> torch.Tensor:
        """Gate the mean state by each query and project back: x (..., N, D), mean (..., 1, S)."""
        w_s, b_s = self._gate_params()
        w_o, b_o = self._out_params()
        if self.recompute:
            return Select.apply(x, mean_state, raw_gate, self.spec, w_s, b_s, w_o, b_o)
        s = (torch.nn.functional.linear(x, w_s) if raw_gate is None else raw_gate) + b_s  # (..., N, G)
        g = gate(s, self.spec, self.state_dim)
        return torch.nn.functional.linear(g * mean_state.to(g.dtype), w_o, b_o)  # (..., N, D)

    # -- entry points ----------------------------------------------------------------------------------------

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
        if context is not None:
            if frame_tokens is not None:
                raise ValueError("frame_tokens (block-causal) applies to self-mixing only; got a context")
            state = self.aggregate(context, context_mask)
            mean = state.sum / state.count.clamp_min(1.0)  # (B, S)
            return self.select(x, mean.unsqueeze(1))
        local, raw_gate = self._aggregate(x, context_mask, frame_tokens, with_gate=True)
        if frame_tokens is None:
            state = self.reducer.reduce(local)
            mean = state.sum / state.count.clamp_min(1.0)  # (B, S)
            return self.select(x, mean.unsqueeze(1), raw_gate)
        prefix = self.reducer.reduce_causal(local)  # (B, F, S), (B, F, 1)
        mean = prefix.sum / prefix.count.clamp_min(1.0)  # (B, F, S)
        # Broadcast each frame's mean over its tokens instead of repeating it (a (B, N, S) copy).
        batch, tokens, dim = x.shape
        frames = tokens // frame_tokens
        x_frames = x.view(batch, frames, frame_tokens, dim)  # (B, F, T, D)
        if raw_gate is not None:
            raw_gate = raw_gate.view(batch, frames, frame_tokens, -1)
        return self.select(x_frames, mean.unsqueeze(2), raw_gate).view(batch, tokens, dim)

    def step(
        self, x: torch.Tensor, state: PoMState | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, PoMState]:
        """Frame-sequential inference: mix the current frame's tokens x (B, T, D) given the cached
        state of the earlier frames, and return (output, state including this frame).

        The caller decides whether to keep the returned state (for example only once the frame is
        fully denoised), so memory stays constant however long the video grows.
        """
        local, raw_gate = self._aggregate(x, mask, None, with_gate=True)
        if state is not None:
            local = PoMState(state.sum + local.sum, state.count + local.count)
        mean = local.sum / local.count.clamp_min(1.0)  # (B, S)
        return self.select(x, mean.unsqueeze(1), raw_gate), local

    def empty_state(self, batch: int, device=None, dtype=torch.float32) -> PoMState:
        """The state of no tokens, to start frame-sequential generation."""
        dtype = state_dtype(dtype)
        return PoMState(
            torch.zeros(batch, self.state_dim, device=device, dtype=dtype),
            torch.zeros(batch, 1, device=device, dtype=dtype),
        )

    @classmethod
    def from_authors_state_dict(cls, state_dict: dict[str, torch.Tensor], *, dim: int, degree: int, expand: int,
                                n_groups: int = 1, n_sel_heads: int = 1, bias: bool = False) -> PoM:
        """A v2 layer holding the weights of the authors' `pom` layer (their key names and shapes:
        qc_proj.weight (W_c rows first), se_bias, po_coeff (e*D, k), ag_proj.weight/.bias; grouped:
        po_proj.weight/.bias (Conv1d), se_proj.weight/.bias). ValueError naming unknown, missing or
        misshapen keys."""
        layer = cls(dim, degree, expand, "v2", n_sel_heads=n_sel_heads, n_groups=n_groups, bias=bias)
        expected = layer.state_dict()
        unknown = sorted(set(state_dict) - set(expected))
        missing = sorted(set(expected) - set(state_dict))
        if unknown or missing:
            raise ValueError(
                f"authors' PoM state dict does not fit PoM(dim={dim}, degree={degree}, expand={expand}, "
                f"n_groups={n_groups}, n_sel_heads={n_sel_heads}, bias={bias}): unknown keys {unknown}, "
                f"missing keys {missing}; check n_groups (grouped layers have po_proj/se_proj) and bias")
        wrong = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if tuple(state_dict[k].shape) != tuple(v.shape)]
        if wrong:
            raise ValueError(f"authors' PoM state dict has shapes that do not fit: {'; '.join(wrong)}")
        layer.load_state_dict(state_dict)
        return layer
