"""Sampler: schedule, solvers, guidance, determinism, and sequential == parallel causal generation."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.configs import DiTConfig
from pipeline.models.dit import PoMDiT
from pipeline.models.sampler import (
    SamplerConfig,
    initial_noise,
    integrate,
    sample,
    sample_sequential,
    shift_timesteps,
    timestep_schedule,
)


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(causal=False, patch_t=1, seed=0) -> PoMDiT:
    torch.manual_seed(seed)
    model = PoMDiT(DiTConfig(in_channels=3, patch_t=patch_t, patch_size=2, width=16, depth=2, text_dim=8,
                             causal=causal)).double()
    with torch.no_grad():  # zero-init gates and output would make every sample equal the noise
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def captions(batch=2):
    g = torch.Generator().manual_seed(3)
    text = torch.randn(batch, 4, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])[:batch]
    null, null_mask = torch.zeros(2, 8, dtype=torch.float64), torch.tensor([True, False])
    return text, mask, null, null_mask


def test_shifted_schedule():
    torch.testing.assert_close(timestep_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    sched = timestep_schedule(10, shift=3.0, dtype=torch.float64)
    assert sched[0] == 1 and sched[-1] == 0 and (sched.diff() < 0).all()
    t = torch.linspace(1, 0, 11, dtype=torch.float64)
    torch.testing.assert_close(sched, 3 * t / (1 + 2 * t))
    assert (shift_timesteps(t[1:-1], 3.0) > t[1:-1]).all()  # more time near the noise


def test_heun_is_second_order_and_euler_first():
    # dx/dt = x from t=1 to 0: exact x(0) = x(1) * e^-1.
    x1 = torch.ones(1, dtype=torch.float64)
    exact = x1 * torch.exp(torch.tensor(-1.0, dtype=torch.float64))

    def error(solver, steps):
        return (integrate(lambda x, t: x, x1, timestep_schedule(steps, dtype=torch.float64), solver) - exact).abs()

    assert error("euler", 40) / error("euler", 80) == pytest.approx(2.0, rel=0.1)
    # Heun's last step is Euler (t_next = 0), which keeps a small first-order part: ratio ~3-4.
    assert error("heun", 40) / error("heun", 80) > 3.0 and error("heun", 40) < error("euler", 40) / 10


@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_for_a_seed(causal):
    model, (text, mask, null, null_mask) = tiny(causal=causal), captions()
    cfg = SamplerConfig(steps=3, guidance=4.0, shift=2.0, solver="heun")

    def run(seed):
        noise = initial_noise((2, 3, 2, 4, 4), seed, dtype=torch.float64)
        return sample(model, noise, text, mask, config=cfg, null_text=null, null_mask=null_mask)

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


def test_one_euler_step_is_noise_minus_the_guided_velocity():
    model, (text, mask, null, null_mask) = tiny(), captions()
    noise = initial_noise((2, 3, 2, 4, 4), 0, dtype=torch.float64)
    out = sample(model, noise, text, mask, config=SamplerConfig(steps=1, guidance=3.0),
                 null_text=null, null_mask=null_mask)
    ones = torch.ones(2, dtype=torch.float64)
    cond = model(noise, ones, text, mask)
    uncond = model(noise, ones, null[None].expand(2, -1, -1), null_mask[None].expand(2, -1))
    torch.testing.assert_close(out, noise - (uncond + 3.0 * (cond - uncond)))


@pytest.mark.parametrize("causal", [False, True])
def test_guidance_one_equals_the_conditional_prediction(causal):
    model, (text, mask, null, null_mask) = tiny(causal=causal), captions()
    noise = initial_noise((2, 3, 2, 4, 4), 1, dtype=torch.float64)
    cfg = SamplerConfig(steps=3, guidance=1.0)
    guided = sample(model, noise, text, mask, config=cfg, null_text=null, null_mask=null_mask)
    torch.testing.assert_close(guided, sample(model, noise, text, mask, config=cfg))
    strong = SamplerConfig(steps=3, guidance=5.0)
    assert not torch.allclose(sample(model, noise, text, mask, config=strong, null_text=null, null_mask=null_mask),
                              guided)
    with pytest.raises(ValueError, match="null_text"):
        sample(model, noise, text, mask, config=strong)


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("patch_t", [1, 2])
def test_sequential_equals_parallel_causal_generation(solver, patch_t):
    model, (text, mask, null, null_mask) = tiny(causal=True, patch_t=patch_t), captions()
    noise = initial_noise((2, 3, 3 * patch_t, 4, 4), 2, dtype=torch.float64)
    cfg = SamplerConfig(steps=3, guidance=2.5, shift=3.0, solver=solver)
    parallel = sample(model, noise, text, mask, config=cfg, null_text=null, null_mask=null_mask)
    streamed = []
    sequential = sample_sequential(model, noise, text, mask, config=cfg, null_text=null, null_mask=null_mask,
                                   on_frame=lambda f, frame: streamed.append((f, frame)))
    torch.testing.assert_close(sequential, parallel)
    assert [f for f, _ in streamed] == [0, 1, 2]
    torch.testing.assert_close(torch.cat([frame for _, frame in streamed], dim=2), sequential)


def test_causal_generation_uses_clean_frames_at_t0_as_context():
    # The semantics both paths share: frame 1 is denoised next to the finished frame 0 at t = 0.
    model, (text, mask, _, _) = tiny(causal=True), captions()
    noise = initial_noise((2, 3, 2, 4, 4), 4, dtype=torch.float64)
    out = sample(model, noise, text, mask, config=SamplerConfig(steps=1, guidance=1.0))
    first = noise[:, :, :1] - model(noise[:, :, :1], torch.ones(2, 1, dtype=torch.float64), text, mask)
    timesteps = torch.tensor([[0.0, 1.0]] * 2, dtype=torch.float64)
    second = noise[:, :, 1:] - model(torch.cat([first, noise[:, :, 1:]], dim=2), timesteps, text, mask)[:, :, 1:]
    torch.testing.assert_close(out, torch.cat([first, second], dim=2))


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="SamplerConfig.solver"):
        SamplerConfig(solver="rk4")
    with pytest.raises(ValueError, match="SamplerConfig.steps"):
        SamplerConfig(steps=0)
    text, mask, _, _ = captions()
    with pytest.raises(ValueError, match="block-causal"):
        sample_sequential(tiny(), torch.zeros(2, 3, 2, 4, 4, dtype=torch.float64), text, mask,
                          config=SamplerConfig(guidance=1.0))
    with pytest.raises(ValueError, match="patch_t=2"):
        sample(tiny(causal=True, patch_t=2), torch.zeros(2, 3, 3, 4, 4, dtype=torch.float64), text, mask,
               config=SamplerConfig(guidance=1.0))
