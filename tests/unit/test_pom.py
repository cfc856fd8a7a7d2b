"""The PoM layer against its equations, written out again here token by token (no shared code)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.pom import PoM, PoMState

DIM, DEGREE, EXPAND = 6, 3, 2


@pytest.fixture(autouse=True)
def _single_thread():
    # Tiny float64 ops: several threads on a shared 2-core machine only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_pom(variant: str, seed: int = 0) -> PoM:
    torch.manual_seed(seed)
    pom = PoM(DIM, degree=DEGREE, expand=EXPAND, variant=variant).double()
    with torch.no_grad():  # non-trivial coefficients so every power matters
        for p in pom.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return pom


def linear(layer, v):
    w, b = layer.weight.tolist(), layer.bias.tolist()
    return [sum(w[o][i] * v[i] for i in range(len(v))) + b[o] for o in range(len(w))]


def features(pom: PoM, c: list[float]) -> list[float]:
    """h = poly(W_h c) for one token, written from the paper (v1) and the pom package (v2)."""
    a = linear(pom.to_features, c)
    if pom.variant == "v1":
        g = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in a]  # exact gelu
        hid = len(g) // DEGREE
        chunks = [g[p * hid:(p + 1) * hid] for p in range(DEGREE)]
        out, running = [], [1.0] * hid
        for chunk in chunks:  # a_1, a_1 a_2, ..., a_1 ... a_k
            running = [r * v for r, v in zip(running, chunk)]
            out += running
        return out
    z = [min(max(v if v >= 0 else 0.1 * v, -2.0), 2.0) for v in a]  # clamped leaky-relu
    coef = pom.coefficients.tolist()
    return [coef[p][i] * z[i] ** (p + 1) for p in range(DEGREE) for i in range(len(z))]


def select(pom: PoM, x: list[float], mean: list[float]) -> list[float]:
    s = linear(pom.to_gate, x)
    if pom.variant == "v1":
        gate = [1 / (1 + math.exp(-v)) for v in s]
    else:
        gate = [min(max(v / 6 + 0.5, 0.0), 1.0) for v in s]  # hard sigmoid
    return linear(pom.to_out, [g * m for g, m in zip(gate, mean)])


def reference(pom, x, context=None, mask=None, frame_tokens=None):
    """out_i = W_o(gate(W_s x_i) * sum_j m_j h_j / sum_j m_j), j over the tokens i may read."""
    ctx = x if context is None else context
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            last = ctx.shape[1] if frame_tokens is None else (i // frame_tokens + 1) * frame_tokens
            total, count = [0.0] * pom.state_dim, 0.0
            for j in range(last):
                m = 1.0 if mask is None else float(mask[b, j])
                if m:
                    total = [t + m * h for t, h in zip(total, features(pom, ctx[b, j].tolist()))]
                    count += m
            mean = [t / max(count, 1.0) for t in total]
            out[b, i] = torch.tensor(select(pom, x[b, i].tolist(), mean), dtype=x.dtype)
    return out


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("with_context", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_equations(variant, with_context, with_mask):
    pom = make_pom(variant)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, DIM, generator=g, dtype=torch.float64)
    context = torch.randn(2, 4, DIM, generator=g, dtype=torch.float64) if with_context else None
    m = (context if with_context else x).shape[1]
    mask = torch.tensor([[True] * m, [True, False] * (m // 2) + [True] * (m % 2)]) if with_mask else None
    if with_mask:
        mask[1, 0] = False  # sample 1 keeps only some tokens
    torch.testing.assert_close(pom(x, context, mask), reference(pom, x, context, mask))


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_block_causal_matches_equations(variant, with_mask):
    pom = make_pom(variant)
    x = torch.randn(2, 9, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = None
    if with_mask:  # sample 1: last frame padded and one token of frame 0 masked
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1, 6:] = False
        mask[1, 1] = False
    torch.testing.assert_close(pom(x, context_mask=mask, frame_tokens=3),
                               reference(pom, x, mask=mask, frame_tokens=3))


def test_all_masked_context_gives_zero_state_not_nan():
    pom = make_pom("v1")
    x, ctx = torch.randn(1, 3, DIM, dtype=torch.float64), torch.randn(1, 4, DIM, dtype=torch.float64)
    out = pom(x, ctx, torch.zeros(1, 4, dtype=torch.bool))
    torch.testing.assert_close(out, pom.to_out.bias.expand_as(out))


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_permutation_equivariance(variant):
    pom = make_pom(variant)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, DIM, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 5, DIM, generator=g, dtype=torch.float64)
    perm, cperm = torch.randperm(7, generator=g), torch.randperm(5, generator=g)
    torch.testing.assert_close(pom(x[:, perm]), pom(x)[:, perm])  # Proposition 1
    torch.testing.assert_close(pom(x[:, perm], ctx[:, cperm]), pom(x, ctx)[:, perm])
    # Duplicating every context token leaves the mean state, hence the output, unchanged.
    torch.testing.assert_close(pom(x, torch.cat([ctx, ctx], dim=1)), pom(x, ctx))


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_masked_context_tokens_have_no_effect(variant):
    pom = make_pom(variant)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, DIM, generator=g, dtype=torch.float64), torch.randn(2, 6, DIM, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True, False, False], [False, True, True, True, True, True]])
    changed = torch.where(mask[..., None], ctx, 100 * torch.randn_like(ctx))
    torch.testing.assert_close(pom(x, changed, mask), pom(x, ctx, mask))
    torch.testing.assert_close(pom(x[:1], ctx[:1, mask[0]]), pom(x, ctx, mask)[:1])  # = dropping them
    assert not torch.allclose(pom(x, changed), pom(x, ctx))  # unmasked, they do matter
    # Self-mixing: masked tokens (padded frames) are left out of the state the others read.
    xs = torch.where(mask[..., :4, None], x, 100 * torch.randn_like(x))
    valid = mask[:, :4]
    torch.testing.assert_close(pom(xs, context_mask=valid)[valid], pom(x, context_mask=valid)[valid])


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_block_causal_ignores_later_frames(variant):
    pom = make_pom(variant)
    x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    base = pom(x, frame_tokens=3)
    for f in range(4):
        changed = x.clone()
        changed[:, 3 * f:] += torch.randn_like(changed[:, 3 * f:])
        out = pom(changed, frame_tokens=3)
        torch.testing.assert_close(out[:, :3 * f], base[:, :3 * f])
        assert (out[:, 3 * f:] - base[:, 3 * f:]).abs().amax(dim=-1).min() > 1e-6  # frames >= f move


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_step_equals_block_causal(variant):
    pom = make_pom(variant)
    x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 4] = False
    parallel = pom(x, context_mask=mask, frame_tokens=4)
    state = pom.empty_state(2, dtype=torch.float64)
    for f in range(3):
        frame = slice(4 * f, 4 * f + 4)
        out, state = pom.step(x[:, frame], state, mask[:, frame])
        torch.testing.assert_close(out, parallel[:, frame])
        assert isinstance(state, PoMState) and state.sum.shape == (2, pom.state_dim)  # constant size
    torch.testing.assert_close(state.count, mask.sum(1, keepdim=True).double())


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="variant"):
        PoM(8, variant="v3")
    pom = PoM(8)
    with pytest.raises(ValueError, match="self-mixing"):
        pom(torch.randn(1, 4, 8), torch.randn(1, 2, 8), frame_tokens=2)
    with pytest.raises(ValueError, match="frame_tokens=3"):
        pom(torch.randn(1, 4, 8), frame_tokens=3)
