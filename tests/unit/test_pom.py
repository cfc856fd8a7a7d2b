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


V2_OPTIONS = {"plain": {}, "heads": dict(n_sel_heads=3), "grouped": dict(n_groups=2, bias=True)}


def make_pom(variant: str, seed: int = 0, **options) -> PoM:
    torch.manual_seed(seed)
    pom = PoM(DIM, degree=DEGREE, expand=EXPAND, variant=variant, **options).double()
    with torch.no_grad():  # non-trivial coefficients so every power matters
        for p in pom.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return pom


def matvec(w, v, b=None):
    return [sum(w[o][i] * v[i] for i in range(len(v))) + (0.0 if b is None else b[o]) for o in range(len(w))]


def linear(layer, v):
    return matvec(layer.weight.tolist(), v, layer.bias.tolist())


def v2_weights(sd: dict, n_groups: int) -> dict:
    """W_c, b_c, W_s, b_s, coeff, W_o, b_o as lists, from a state dict with the authors' key names."""
    hidden = sd["po_coeff"].shape[0]
    out = {"coeff": sd["po_coeff"].tolist(), "W_o": sd["ag_proj.weight"].tolist(),
           "b_o": sd["ag_proj.bias"].tolist() if "ag_proj.bias" in sd else None}
    if n_groups == 1:  # one stacked matrix: W_c's rows first, then W_s's
        out |= {"W_c": sd["qc_proj.weight"][:hidden].tolist(), "b_c": None,
                "W_s": sd["qc_proj.weight"][hidden:].tolist(), "b_s": sd["se_bias"].tolist()}
        return out
    # Conv1d(D, e*D, 1, groups=G): output channel o reads input channels of group o // (e*D / G) only
    conv, per_group = sd["po_proj.weight"], sd["po_proj.weight"].shape[1]
    dense = torch.zeros(hidden, per_group * n_groups, dtype=conv.dtype)
    for o in range(hidden):
        g = o // (hidden // n_groups)
        dense[o, g * per_group:(g + 1) * per_group] = conv[o, :, 0]
    out |= {"W_c": dense.tolist(), "b_c": sd["po_proj.bias"].tolist() if "po_proj.bias" in sd else None,
            "W_s": sd["se_proj.weight"].tolist(), "b_s": sd["se_proj.bias"].tolist()}
    return out


def features(pom: PoM, c: list[float]) -> list[float]:
    """h = poly(W_c c) for one token, written from the paper (v1) and the authors' pom package (v2)."""
    if pom.variant == "v1":
        a = linear(pom.to_features, c)
        g = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in a]  # exact gelu
        hid = len(g) // DEGREE
        chunks = [g[p * hid:(p + 1) * hid] for p in range(DEGREE)]
        out, running = [], [1.0] * hid
        for chunk in chunks:  # a_1, a_1 a_2, ..., a_1 ... a_k
            running = [r * v for r, v in zip(running, chunk)]
            out += running
        return out
    w = v2_weights(pom.state_dict(), pom.n_groups)
    a = [min(max(v if v >= 0 else 0.01 * v, -0.1), 6.0) for v in matvec(w["W_c"], c, w["b_c"])]
    return [sum(w["coeff"][i][p] * a[i] ** (p + 1) for p in range(DEGREE)) for i in range(len(a))]


def select(pom: PoM, x: list[float], mean: list[float]) -> list[float]:
    if pom.variant == "v1":
        gate = [1 / (1 + math.exp(-v)) for v in linear(pom.to_gate, x)]
        return linear(pom.to_out, [g * m for g, m in zip(gate, mean)])
    w = v2_weights(pom.state_dict(), pom.n_groups)
    heads = [min(max(v / 6 + 0.5, 0.0), 1.0) for v in matvec(w["W_s"], x, w["b_s"])]  # hard sigmoid
    width = len(mean) // len(heads)  # 1 without selection heads
    gate = [heads[i // width] for i in range(len(mean))]  # head h scales channels [h*width, (h+1)*width)
    return matvec(w["W_o"], [g * m for g, m in zip(gate, mean)], w["b_o"])


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


KINDS = ["v1"] + [f"v2-{name}" for name in V2_OPTIONS]


def make_kind(kind: str, seed: int = 0) -> PoM:
    """v1, or v2 plain (stacked W_c/W_s), with selection heads, or grouped with biases."""
    return make_pom("v1", seed) if kind == "v1" else make_pom("v2", seed, **V2_OPTIONS[kind[3:]])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_context", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_equations(kind, with_context, with_mask):
    pom = make_kind(kind)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, DIM, generator=g, dtype=torch.float64)
    context = torch.randn(2, 4, DIM, generator=g, dtype=torch.float64) if with_context else None
    m = (context if with_context else x).shape[1]
    mask = torch.tensor([[True] * m, [True, False] * (m // 2) + [True] * (m % 2)]) if with_mask else None
    if with_mask:
        mask[1, 0] = False  # sample 1 keeps only some tokens
    torch.testing.assert_close(pom(x, context, mask), reference(pom, x, context, mask))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_block_causal_matches_equations(kind, with_mask):
    pom = make_kind(kind)
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


@pytest.mark.parametrize("kind", KINDS)
def test_step_equals_block_causal(kind):
    pom = make_kind(kind)
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
    with pytest.raises(ValueError, match="v2's options"):
        PoM(8, n_sel_heads=4)
    with pytest.raises(ValueError, match="n_sel_heads=3 must divide"):
        PoM(8, variant="v2", n_sel_heads=3)
    with pytest.raises(ValueError, match="n_groups=3 must divide dim=8"):
        PoM(8, variant="v2", n_groups=3)


def authors_state_dict(n_groups: int, n_sel_heads: int, bias: bool, seed: int = 9) -> dict:
    """A state dict shaped like the authors' layer (their names), with random values."""
    g = torch.Generator().manual_seed(seed)
    hidden = EXPAND * DIM
    heads = hidden if n_sel_heads <= 1 else n_sel_heads
    shapes = {"po_coeff": (hidden, DEGREE), "ag_proj.weight": (DIM, hidden)}
    if n_groups == 1:
        shapes |= {"qc_proj.weight": (hidden + heads, DIM), "se_bias": (heads,)}
    else:
        shapes |= {"po_proj.weight": (hidden, DIM // n_groups, 1), "se_proj.weight": (heads, DIM),
                   "se_proj.bias": (heads,)}
        if bias:
            shapes["po_proj.bias"] = (hidden,)
    if bias:
        shapes["ag_proj.bias"] = (DIM,)
    return {k: 0.5 * torch.randn(shape, generator=g, dtype=torch.float64) for k, shape in shapes.items()}


@pytest.mark.parametrize("n_groups, n_sel_heads, bias", [(1, 1, False), (1, 4, True), (3, 0, True), (2, 2, False)])
def test_v2_from_authors_state_dict_matches_the_formula(n_groups, n_sel_heads, bias):
    sd = authors_state_dict(n_groups, n_sel_heads, bias)
    pom = PoM.from_authors_state_dict(sd, dim=DIM, degree=DEGREE, expand=EXPAND, n_groups=n_groups,
                                      n_sel_heads=n_sel_heads, bias=bias).double()
    assert pom.state_dim == EXPAND * DIM  # e*D wide, not k*e*D
    assert set(pom.state_dict()) == set(sd)
    for key, value in pom.state_dict().items():  # the round trip: their weights come back unchanged
        torch.testing.assert_close(value, sd[key])
    x = torch.randn(2, 6, DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    torch.testing.assert_close(pom(x, context_mask=mask), reference(pom, x, mask=mask))
    torch.testing.assert_close(pom(x, frame_tokens=2), reference(pom, x, frame_tokens=2))


def test_from_authors_state_dict_names_bad_keys():
    sd = authors_state_dict(1, 1, False)
    extra = sd | {"norm.weight": torch.ones(DIM)}
    with pytest.raises(ValueError, match=r"unknown keys \['norm.weight'\]"):
        PoM.from_authors_state_dict(extra, dim=DIM, degree=DEGREE, expand=EXPAND)
    missing = {k: v for k, v in sd.items() if k != "se_bias"}
    with pytest.raises(ValueError, match=r"missing keys \['se_bias'\]"):
        PoM.from_authors_state_dict(missing, dim=DIM, degree=DEGREE, expand=EXPAND)
    with pytest.raises(ValueError, match=r"missing keys \['ag_proj.bias'\]"):
        PoM.from_authors_state_dict(sd, dim=DIM, degree=DEGREE, expand=EXPAND, bias=True)
    with pytest.raises(ValueError, match=r"po_coeff: \(12, 3\) != \(12, 2\)"):
        PoM.from_authors_state_dict(sd, dim=DIM, degree=2, expand=EXPAND)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["bidirectional", "masked", "block-causal", "masked block-causal", "cross"])
def test_recomputing_backward_equals_autograd(kind, mode):
    """The Functions that keep only inputs give the gradients of plain autograd (float64)."""
    pom = make_kind(kind)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 8, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 5, DIM, generator=g, dtype=torch.float64, requires_grad=True) if mode == "cross" else None
    mask = torch.rand(2, 5 if ctx is not None else 8, generator=g) > 0.3 if "masked" in mode or ctx is not None else None
    frame_tokens = 2 if "causal" in mode else None
    weight = torch.randn(2, 8, DIM, generator=g, dtype=torch.float64)
    results = []
    for recompute in (True, False):
        pom.recompute = recompute
        inputs = [x] + ([ctx] if ctx is not None else []) + list(pom.parameters())
        out = pom(x, ctx, mask, frame_tokens)
        results.append([out] + list(torch.autograd.grad((out * weight).sum(), inputs)))
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain)
    pom.recompute = True  # and against finite differences, for the inputs
    wrt = (x,) if ctx is None else (x, ctx)
    assert torch.autograd.gradcheck(lambda *a: pom(a[0], a[1] if ctx is not None else None, mask, frame_tokens),
                                    wrt)
