"""Rectified flow: training inputs, masked loss (also sharded), caption dropout, overfitting a batch."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.configs import DiTConfig
from pipeline.models.dit import PoMDiT
from pipeline.models.flow import drop_captions, flow_matching_loss, make_training_inputs


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("per_frame", [False, True])
def test_inputs_follow_the_rectified_flow(per_frame):
    x0 = torch.randn(3, 2, 4, 3, 3, generator=gen(9))
    noisy, t, target = make_training_inputs(x0, generator=gen(), patch_t=2, per_frame_timesteps=per_frame)
    assert t.shape == ((3, 2) if per_frame else (3,)) and ((t > 0) & (t < 1)).all()
    eps = target + x0  # target = eps - x0
    t_full = (t.repeat_interleave(2, dim=1) if per_frame else t[:, None].expand(3, 4))[:, None, :, None, None]
    torch.testing.assert_close(noisy, (1 - t_full) * x0 + t_full * eps)
    assert abs(eps.mean().item()) < 0.3 and abs(eps.std().item() - 1) < 0.3  # eps is N(0, 1) noise
    if per_frame:
        assert not torch.equal(t[:, 0], t[:, 1])  # independent per token-frame


def test_same_generator_same_draws_on_every_rank():
    x0 = torch.randn(2, 2, 4, 3, 3)
    a, b = make_training_inputs(x0, generator=gen(5)), make_training_inputs(x0, generator=gen(5))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[1], make_training_inputs(x0, generator=gen(6))[1])


def test_logit_normal_mean_and_std():
    _, t, _ = make_training_inputs(torch.zeros(20000, 1, 1, 1, 1), generator=gen(), logit_mean=0.5, logit_std=0.7)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.03 and abs(logit.std().item() - 0.7) < 0.03


def test_clean_prefix_sets_leading_frames_to_t0():
    x0 = torch.randn(64, 2, 5, 2, 2, generator=gen(1))
    noisy, t, _ = make_training_inputs(x0, generator=gen(), per_frame_timesteps=True, clean_prefix_prob=1.0)
    clean = t == 0
    prefix = clean.sum(dim=1)
    assert ((prefix >= 1) & (prefix <= 4)).all()  # 1..F-1 clean frames, at least one noisy
    assert torch.equal(clean, torch.arange(5) < prefix[:, None])  # a prefix, not scattered
    assert len(prefix.unique()) == 4
    for b in range(64):
        k = prefix[b]
        assert torch.equal(noisy[b, :, :k], x0[b, :, :k]) and not torch.equal(noisy[b, :, k:], x0[b, :, k:])
    with pytest.raises(ValueError, match="per_frame_timesteps"):
        make_training_inputs(x0, generator=gen(), clean_prefix_prob=0.5)


def test_loss_is_the_mean_of_per_sample_means_over_valid_frames():
    pred, target = torch.randn(2, 3, 4, 2, 2, generator=gen(1)), torch.randn(2, 3, 4, 2, 2, generator=gen(2))
    frame_mask = torch.tensor([[True, True], [True, False]])  # token-frames of 2 latent frames
    expected = ((pred[0] - target[0]).square().mean() + (pred[1, :, :2] - target[1, :, :2]).square().mean()) / 2
    torch.testing.assert_close(flow_matching_loss(pred, target, frame_mask), expected)
    torch.testing.assert_close(flow_matching_loss(pred, target), (pred - target).square().mean())
    junk = pred.clone()
    junk[1, :, 2:] = 1e3
    torch.testing.assert_close(flow_matching_loss(junk, target, frame_mask), expected)


def test_sharded_losses_with_global_normaliser_sum_to_the_full_loss():
    pred, target = torch.randn(2, 3, 6, 2, 2, generator=gen(1)), torch.randn(2, 3, 6, 2, 2, generator=gen(2))
    frame_mask = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    full = flow_matching_loss(pred, target, frame_mask)
    normaliser = frame_mask.sum(1) * 3 * 2 * 2  # valid elements per sample, over all ranks
    shards = [slice(0, 2), slice(2, 4), slice(4, 6)]
    total = sum(flow_matching_loss(pred[:, :, s], target[:, :, s], frame_mask[:, s], normaliser) for s in shards)
    torch.testing.assert_close(total, full)


def test_caption_dropout_to_the_null_embedding():
    text, mask = torch.randn(64, 3, 4, generator=gen(1)), torch.ones(64, 3, dtype=torch.bool)
    null, null_mask = torch.full((5, 4), 7.0), torch.tensor([True, False, False, False, False])
    kept, kept_mask = drop_captions(text, mask, null, null_mask, prob=0.0, generator=gen())
    assert torch.equal(kept[:, :3], text) and kept.shape == (64, 5, 4) and not kept_mask[:, 3:].any()
    dropped, dropped_mask = drop_captions(text, mask, null, null_mask, prob=1.0, generator=gen())
    assert (dropped == 7.0).all() and torch.equal(dropped_mask, null_mask.expand(64, -1))
    some, _ = drop_captions(text, mask, null, null_mask, prob=0.5, generator=gen())
    n_dropped = (some[:, 0, 0] == 7.0).sum().item()
    assert 16 < n_dropped < 48
    again, _ = drop_captions(text, mask, null, null_mask, prob=0.5, generator=gen())
    assert torch.equal(some, again)


@pytest.mark.parametrize("causal", [False, True])
def test_tiny_model_overfits_one_batch(causal):
    torch.manual_seed(0)
    model = PoMDiT(DiTConfig(in_channels=4, patch_size=2, width=32, depth=2, text_dim=8, causal=causal))
    x0 = torch.randn(2, 4, 4, 8, 8, generator=gen())
    text, text_mask = torch.randn(2, 3, 8, generator=gen(1)), torch.ones(2, 3, dtype=torch.bool)
    frame_mask = torch.tensor([[True] * 4, [True, True, True, False]])
    # One fixed draw of noise and t: the loss can then go to ~0 (a fresh draw keeps its variance).
    noisy, t, target = make_training_inputs(x0, generator=gen(2), per_frame_timesteps=causal)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = flow_matching_loss(model(noisy, t, text, text_mask, frame_mask), target, frame_mask)
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] / 10, f"loss went {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"
