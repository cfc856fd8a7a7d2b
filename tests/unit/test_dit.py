"""PoM DiT: sizes, zero init, padding, block-causal parallel == stateful, embeddings, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.configs import DIT_SIZES, DiTConfig, build_dit, training_flops
from pipeline.models.dit import PoMDiT
from pipeline.models.embeddings import patchify, sincos_3d, unpatchify


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed=0, randomise=True, dtype=torch.float64, **overrides) -> PoMDiT:
    """A tiny model; `randomise` perturbs every weight (zero-init gates would make tests vacuous)."""
    fields = dict(in_channels=3, patch_t=1, patch_size=2, width=16, depth=2, text_dim=8)
    torch.manual_seed(seed)
    model = PoMDiT(DiTConfig(**(fields | overrides))).to(dtype)
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model


def inputs(model, batch=2, frames=3, hw=(4, 6), seed=1, per_frame=True):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    dtype = next(model.parameters()).dtype
    latents = torch.randn(batch, c.in_channels, frames * c.patch_t, *hw, generator=g, dtype=dtype)
    t = torch.rand((batch, frames) if per_frame else (batch,), generator=g, dtype=dtype)
    text = torch.randn(batch, 5, c.text_dim, generator=g, dtype=dtype)
    text_mask = torch.tensor([[True] * 5, [True, True, False, True, False]])[:batch]
    return latents, t, text, text_mask


def expected_parameters(c: DiTConfig) -> int:
    """The architecture formula: v1's Linears are in*out + out; v2 (no biases by default) has W_c
    (D/G inputs per output when grouped, with a bias then), W_s with a bias, (e*D, k) coefficients."""
    d, state, hidden = c.width, c.degree * c.expand * c.width, int(c.width * c.mlp_ratio)
    patch = c.in_channels * c.patch_t * c.patch_size**2
    if c.variant == "v1":
        pom = (d * state + state) + (d * state + state) + (state * d + d)  # features, gate, output
    else:
        e_d = c.expand * d
        gate = c.n_sel_heads if c.n_sel_heads > 1 else e_d
        w_c = d * e_d if c.n_groups == 1 else (d // c.n_groups) * e_d
        pom = w_c + (d * gate + gate) + e_d * c.degree + e_d * d
    block = 2 * pom + (d * hidden + hidden + hidden * d + d) + (d * 9 * d + 9 * d)
    outer = (patch * d + d) + (c.freq_dim * d + d + d * d + d) + (c.text_dim * d + d + d * d + d)
    final = (d * 2 * d + 2 * d) + (d * patch + patch)
    return c.depth * block + outer + final


@pytest.mark.parametrize("size", sorted(DIT_SIZES))
def test_every_size_builds_with_expected_parameter_count(size):
    with torch.device("meta"):
        model = build_dit(size)
    assert (model.config.width, model.config.depth) == tuple(DIT_SIZES[size].values())
    assert (model.config.degree, model.config.expand) == (2, 2)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(model.config)


@pytest.mark.parametrize("variant, options", [("v1", {}), ("v2", {}), ("v2", dict(n_sel_heads=4, n_groups=2))])
def test_parameter_count_formula_on_a_real_model(variant, options):
    model = tiny(variant=variant, randomise=False, patch_t=2, mlp_ratio=3.0, degree=3, **options)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(model.config)


@pytest.mark.parametrize("causal", [False, True])
def test_output_is_zero_at_init(causal):
    model = tiny(randomise=False, causal=causal, dtype=torch.float32)
    out = model(*inputs(model))
    assert out.shape == inputs(model)[0].shape and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("patch_t", [1, 2])
def test_block_causal_parallel_equals_frame_by_frame(variant, patch_t):
    model = tiny(causal=True, variant=variant, patch_t=patch_t)
    latents, t, text, mask = inputs(model, frames=4)
    parallel = model(latents, t, text, mask)
    cache, frames = None, []
    for f in range(4):
        chunk = latents[:, :, f * patch_t:(f + 1) * patch_t]
        v, cache = model.forward_frame(chunk, t[:, f], text, mask, f, cache)
        frames.append(v)
        assert len(cache) == 2 and cache[0].sum.shape == (2, model.blocks[0].self_pom.state_dim)
    torch.testing.assert_close(torch.cat(frames, dim=2), parallel)


def test_block_causal_ignores_later_frames_and_bidirectional_does_not():
    latents, t, text, mask = inputs(tiny(), frames=4)
    changed = latents.clone()
    changed[:, :, 2:] += 1.0
    causal, bidir = tiny(causal=True), tiny(causal=False)
    torch.testing.assert_close(causal(changed, t, text, mask)[:, :, :2], causal(latents, t, text, mask)[:, :, :2])
    assert not torch.allclose(bidir(changed, t, text, mask)[:, :, :2], bidir(latents, t, text, mask)[:, :, :2])


@pytest.mark.parametrize("causal", [False, True])
def test_padded_frames_have_no_effect_on_valid_frames(causal):
    model = tiny(causal=causal)
    latents, t, text, mask = inputs(model, frames=4)
    frame_mask = torch.tensor([[True, True, True, True], [True, False, True, False]])
    valid = frame_mask[1]
    out = model(latents, t, text, mask, frame_mask)
    junk, t_junk = latents.clone(), t.clone()
    junk[1][:, ~valid] = 50 * torch.randn_like(junk[1][:, ~valid])
    t_junk[1, ~valid] = 0.9
    torch.testing.assert_close(model(junk, t_junk, text, mask, frame_mask)[1][:, valid], out[1][:, valid])
    torch.testing.assert_close(out[0], model(latents[:1], t[:1], text[:1], mask[:1])[0])
    # Without the mask the junk reaches the valid frame after it: the test can fail.
    assert not torch.allclose(model(junk, t_junk, text, mask)[1][:, valid], out[1][:, valid])


@pytest.mark.parametrize("causal", [False, True])
def test_trailing_padding_equals_the_shorter_video(causal):
    model = tiny(causal=causal)
    latents, t, text, mask = inputs(model, frames=4)
    frame_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    out = model(latents, t, text, mask, frame_mask)
    short = model(latents[1:, :, :2], t[1:, :2], text[1:], mask[1:])
    torch.testing.assert_close(out[1:, :, :2], short)


def test_shared_timesteps_equal_repeated_per_frame_timesteps():
    model = tiny()
    latents, _, text, mask = inputs(model)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    torch.testing.assert_close(model(latents, t, text, mask), model(latents, t[:, None].repeat(1, 3), text, mask))


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny(causal=True)
    batch = inputs(model)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(enabled)
        model(*batch).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_patchify_is_frame_major_and_inverts():
    x = torch.randn(2, 3, 4, 6, 8)
    tokens = patchify(x, 2, 2)  # grid (2, 3, 4)
    assert tokens.shape == (2, 24, 3 * 2 * 2 * 2)
    torch.testing.assert_close(tokens[:, :12], patchify(x[:, :, :2], 2, 2))  # frame 0 first, contiguous
    torch.testing.assert_close(tokens[0, 5].view(3, 2, 2, 2), x[0, :, 0:2, 2:4, 2:4])  # row 1, col 1
    torch.testing.assert_close(unpatchify(tokens, 3, (2, 3, 4), 2, 2), x)


def test_position_embeddings_use_the_global_frame_offset():
    full = sincos_3d((5, 2, 3), 24)
    torch.testing.assert_close(sincos_3d((2, 2, 3), 24, frame_offset=3), full[3 * 6:])
    assert torch.unique(full, dim=0).shape[0] == 30  # every position distinct


@pytest.mark.parametrize("options", [dict(variant="v1"), dict(variant="v2"),
                                     dict(variant="v2", n_sel_heads=4, n_groups=2)])
def test_training_flops_match_a_flop_counter(options):
    model = tiny(randomise=False, dtype=torch.float32, patch_t=2, **options)
    latents, t, text, mask = inputs(model, frames=3, hw=(4, 6))
    with FlopCounterMode(display=False) as counter:
        model(latents.float(), t.float(), text.float(), mask)
    flops = training_flops(model.config, batch=2, frames=6, height=4, width=6, text_len=5)
    assert flops == 3 * counter.get_total_flops()


def test_bad_config_and_inputs_are_explained():
    with pytest.raises(ValueError, match="DiTConfig.width=15"):
        DiTConfig(width=15)
    with pytest.raises(ValueError, match="DiTConfig.variant"):
        DiTConfig(variant="v9")
    with pytest.raises(ValueError, match="need variant='v2'"):
        DiTConfig(n_sel_heads=4)
    with pytest.raises(ValueError, match="DiTConfig.n_groups=5 must divide width=384"):
        DiTConfig(variant="v2", n_groups=5)
    with pytest.raises(ValueError, match="unknown DiT size"):
        build_dit("XXL")
    model = tiny()
    latents, t, text, mask = inputs(model)
    with pytest.raises(ValueError, match="patch_size=2"):
        model(latents[..., :3], t, text, mask)
    with pytest.raises(ValueError, match="timesteps"):
        model(latents, t[:, :2], text, mask)
    with pytest.raises(ValueError, match="frame_mask"):
        model(latents, t, text, mask, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="block-causal"):
        model.forward_frame(latents[:, :, :1], t[:, 0], text, mask, 0)
