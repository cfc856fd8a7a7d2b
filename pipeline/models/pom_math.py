"""The math of a PoM layer, and the two autograd Functions that keep only their inputs for backward.

A PoM layer is aggregate -> reduce -> select (pipeline/models/pom.py). Plain autograd would keep,
per token, the projection, the activation, every power and the gate: 18x-22x the input at width 384,
3-4x what attention keeps. `Aggregate` and `Select` below keep only what they are given (x, the mask,
the small state and the weights) and recompute the per-token features and gate in backward, with
the derivatives written out. The reducer between them (the prefix over frames, the SP collectives)
stays ordinary autograd on tensors of state size, so the model still never sees a process group.

Both Functions are pure tensor code, so torch.compile traces their forward and backward. The same
elementwise helpers serve the plain-autograd path (`PoM.recompute = False`), which is the reference
the tests compare the hand-written gradients with.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

V2_SLOPE, V2_MIN, V2_MAX = 0.01, -0.1, 6.0  # the authors' clamp(leaky_relu(h, 0.01), -0.1, 6)


class MixSpec(NamedTuple):
    """What the Functions need to know about the layer (no tensors: hashable for the compiler)."""

    variant: str
    """"v1" (gelu chunks, cumulative products, sigmoid gate) or "v2" (powers, hard-sigmoid gate)."""
    degree: int
    """Polynomial degree k."""
    features: int
    """Rows of the projection that are features: k*e*D (v1) or e*D (v2); further rows are the gate's."""
    groups: int
    """Groups of the feature projection (v2 only; 1 = a plain matrix)."""
    heads: int
    """Selection heads: <= 1, the gate is as wide as the state; H, each gate channel scales S/H."""


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The state is accumulated in at least float32: in bf16 a sum over 100k tokens loses most of its
    digits and counts above 256 are not even representable. The state is tiny (B x S)."""
    return torch.promote_types(dtype, torch.float32)


# -- elementwise pieces, shared by both paths ------------------------------------------------------------


def project(c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    """c (..., D) -> (..., R): a Linear, or a grouped 1x1 convolution (weight (R, D/G, 1)) with groups=G."""
    if groups == 1:
        return F.linear(c, weight, bias)
    rows, per_group = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, rows // groups, per_group)  # (G, R/G, D/G): Conv1d's grouping
    y = torch.einsum("...gi,goi->...go", c.unflatten(-1, (groups, per_group)), w).flatten(-2)
    return y if bias is None else y + bias


def v2_activation(y: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(y, V2_SLOPE).clamp(V2_MIN, V2_MAX)


def polynomial(y: torch.Tensor, coeff: torch.Tensor | None, spec: MixSpec) -> torch.Tensor:
    """Features of the projected tokens: (..., k*e*D) -> (..., k*e*D) (v1) or (..., e*D) (v2)."""
    if spec.variant == "v1":
        chunks = F.gelu(y).chunk(spec.degree, dim=-1)  # k x (..., e*D)
        products, running = [], None
        for chunk in chunks:  # a_1, a_1 a_2, ..., a_1 ... a_k
            running = chunk if running is None else running * chunk
            products.append(running)
        return torch.cat(products, dim=-1)
    a = v2_activation(y)  # (..., e*D)
    power, out = a, a * coeff[:, 0]
    for p in range(1, spec.degree):  # sum_p c_p a^p, coefficients per channel
        power = power * a
        out = out + power * coeff[:, p]
    return out


def gate(s: torch.Tensor, spec: MixSpec, state_width: int) -> torch.Tensor:
    """Gate of each query, widened to the state: (..., G) -> (..., S)."""
    g = torch.sigmoid(s) if spec.variant == "v1" else F.hardsigmoid(s)
    if spec.heads > 1:  # head h of the gate scales the contiguous channels [h*S/H, (h+1)*S/H)
        g = g.repeat_interleave(state_width // spec.heads, dim=-1)
    return g


def masked_sum(h: torch.Tensor, weights: torch.Tensor | None, frame_tokens: int | None) -> torch.Tensor:
    """Sum of the features over tokens (B, M, S) -> (B, S), or per frame -> (B, F, S), in state dtype."""
    dtype = state_dtype(h.dtype)
    if weights is not None:
        h = h * weights.unsqueeze(-1)
    if frame_tokens is None:
        return h.sum(dim=1, dtype=dtype)
    b, m, s = h.shape
    return h.view(b, m // frame_tokens, frame_tokens, s).sum(dim=2, dtype=dtype)


# -- derivatives of the elementwise pieces -----------------------------------------------------------------


def _gelu_grad(y: torch.Tensor) -> torch.Tensor:
    # d/dy y*Phi(y) = Phi(y) + y*phi(y), the exact (erf) gelu of F.gelu's default
    return 0.5 * (1 + torch.erf(y * (1 / math.sqrt(2)))) + y * torch.exp(-0.5 * y * y) / math.sqrt(2 * math.pi)


def _polynomial_backward(y, coeff, spec: MixSpec, dh):
    """(d y, d coeff) of sum(dh * polynomial(y)), recomputing the features from y."""
    if spec.variant == "v1":
        a = F.gelu(y).chunk(spec.degree, dim=-1)
        g = dh.chunk(spec.degree, dim=-1)
        prefix = [torch.ones_like(a[0])]  # prefix[p] = a_1 ... a_p (the feature of order p)
        for chunk in a[:-1]:
            prefix.append(prefix[-1] * chunk)
        # d/d a_q of sum_p g_p * a_1...a_p = prefix[q-1] * R_q, R_q = g_q + a_{q+1} R_{q+1} (from the top)
        grads, rest = [None] * spec.degree, None
        for q in reversed(range(spec.degree)):
            rest = g[q] if rest is None else g[q] + a[q + 1] * rest
            grads[q] = prefix[q] * rest
        return torch.cat(grads, dim=-1) * _gelu_grad(y), None
    leaky = F.leaky_relu(y, V2_SLOPE)
    a = leaky.clamp(V2_MIN, V2_MAX)
    # clamp passes the gradient on [min, max] (inclusive), leaky_relu has slope 1 for y > 0
    act_grad = torch.where(y > 0, 1.0, V2_SLOPE).to(y.dtype) * ((leaky >= V2_MIN) & (leaky <= V2_MAX))
    power_prev, poly_grad, dcoeff = torch.ones_like(a), torch.zeros_like(a), []
    for p in range(spec.degree):  # power_prev = a^p before the update
        poly_grad = poly_grad + (p + 1) * coeff[:, p] * power_prev
        power_prev = power_prev * a
        dcoeff.append((dh * power_prev).reshape(-1, a.shape[-1]).sum(0))
    return dh * poly_grad * act_grad, torch.stack(dcoeff, dim=-1)  # (..., e*D), (e*D, k)


def _gate_backward(s, g_narrow, spec: MixSpec, dg):
    if spec.variant == "v1":
        return dg * g_narrow * (1 - g_narrow)
    return dg * ((s > -3.0) & (s < 3.0)).to(s.dtype) / 6.0  # F.hardsigmoid's derivative


def _project_backward(c, weight, groups: int, dy, need_c: bool):
    """(d c, d weight, d bias) of a projection, dy (..., R)."""
    if groups == 1:
        dc = dy @ weight if need_c else None
        dw = dy.reshape(-1, dy.shape[-1]).T @ c.reshape(-1, c.shape[-1])
    else:
        rows, per_group = weight.shape[0], weight.shape[1]
        w = weight.reshape(groups, rows // groups, per_group)
        dyg, cg = dy.unflatten(-1, (groups, rows // groups)), c.unflatten(-1, (groups, per_group))
        dc = torch.einsum("...go,goi->...gi", dyg, w).flatten(-2) if need_c else None
        dw = torch.einsum("...go,...gi->goi", dyg, cg).reshape(weight.shape)
    return dc, dw, dy.reshape(-1, dy.shape[-1]).sum(0)


# -- the two Functions -----------------------------------------------------------------------------------


class Aggregate(torch.autograd.Function):
    """Masked sum of the features of the context tokens, keeping only (context, mask, weights).

    context (B, M, D); weights (B, M) float or None; frame_tokens None (-> (B, S)) or T (-> (B, F, S)).
    When `weight` has more rows than spec.features (v2's stacked W_c/W_s, self-mixing), the extra rows
    are the queries' raw gate, returned as a second output (B, M, G) so one GEMM serves both.
    """

    @staticmethod
    def forward(ctx, context, weights, frame_tokens, spec, weight, bias, coeff):
        y = project(context, weight, bias, spec.groups)  # (B, M, R)
        state = masked_sum(polynomial(y[..., :spec.features], coeff, spec), weights, frame_tokens)
        ctx.save_for_backward(context, weights, weight, bias, coeff)
        ctx.frame_tokens, ctx.spec = frame_tokens, spec
        ctx.stacked = weight.shape[0] > spec.features
        if ctx.stacked:
            return state, y[..., spec.features:]
        return state

    @staticmethod
    def backward(ctx, d_state, d_gate=None):
        context, weights, weight, bias, coeff = ctx.saved_tensors
        spec, frame_tokens = ctx.spec, ctx.frame_tokens
        y = project(context, weight[:spec.features], None if bias is None else bias[:spec.features], spec.groups)
        b, m, _ = context.shape
        d_state = d_state.to(y.dtype)
        if frame_tokens is None:  # every token of a sample read the same sum
            dh = d_state.unsqueeze(1).expand(b, m, d_state.shape[-1])  # (B, M, S)
        else:
            frames = m // frame_tokens
            dh = d_state.unsqueeze(2).expand(b, frames, frame_tokens, d_state.shape[-1]).reshape(b, m, -1)
        if weights is not None:
            dh = dh * weights.unsqueeze(-1)
        dy, dcoeff = _polynomial_backward(y, coeff, spec, dh)  # (B, M, features)
        if ctx.stacked:
            dy = torch.cat([dy, torch.zeros_like(d_gate) if d_gate is None else d_gate.to(dy.dtype)], dim=-1)
        dc, dw, db = _project_backward(context, weight, spec.groups, dy, ctx.needs_input_grad[0])
        return dc, None, None, None, dw, (db if bias is not None else None), dcoeff


class Select(torch.autograd.Function):
    """out = W_o(gate(W_s x + b_s) * mean) + b_o, keeping only (x, mean, weights).

    x (..., N, D) with mean (..., 1, S) (bidirectional: (B, N, D), (B, 1, S); block-causal:
    (B, F, T, D), (B, F, 1, S)). With `raw_gate` (..., N, G) given (stacked GEMM), W_s x was already
    computed by `Aggregate`; w_s is then used only to recompute it, and its gradient goes there.
    """

    @staticmethod
    def forward(ctx, x, mean, raw_gate, spec, w_s, b_s, w_o, b_o):
        s = (raw_gate if raw_gate is not None else F.linear(x, w_s)) + b_s  # (..., N, G)
        out = F.linear(gate(s, spec, mean.shape[-1]) * mean.to(x.dtype), w_o, b_o)  # (..., N, D)
        ctx.save_for_backward(x, mean, w_s, b_s, w_o)
        ctx.spec, ctx.given_gate, ctx.has_out_bias = spec, raw_gate is not None, b_o is not None
        return out

    @staticmethod
    def backward(ctx, d_out):
        x, mean, w_s, b_s, w_o = ctx.saved_tensors
        spec = ctx.spec
        s = F.linear(x, w_s) + b_s  # (..., N, G): recomputed
        g_narrow = torch.sigmoid(s) if spec.variant == "v1" else F.hardsigmoid(s)
        width = mean.shape[-1]
        g = g_narrow.repeat_interleave(width // spec.heads, dim=-1) if spec.heads > 1 else g_narrow
        m = mean.to(x.dtype)
        u = g * m  # (..., N, S)
        d_flat = d_out.reshape(-1, d_out.shape[-1])
        dw_o = d_flat.T @ u.reshape(-1, width)
        db_o = d_flat.sum(0) if ctx.has_out_bias else None
        du = d_out @ w_o  # (..., N, S)
        d_mean = (du * g).sum(dim=-2, keepdim=True).to(mean.dtype)  # every query read the same mean
        dg = du * m
        if spec.heads > 1:
            dg = dg.unflatten(-1, (spec.heads, width // spec.heads)).sum(-1)  # (..., N, H)
        ds = _gate_backward(s, g_narrow, spec, dg)  # (..., N, G)
        db_s = ds.reshape(-1, ds.shape[-1]).sum(0)
        if ctx.given_gate:
            return None, d_mean, ds, None, None, db_s, dw_o, db_o
        dx, dw_s, _ = _project_backward(x, w_s, 1, ds, ctx.needs_input_grad[0])
        return dx, d_mean, None, None, dw_s, db_s, dw_o, db_o
