"""A block-causal model trained with per-frame timesteps (diffusion forcing) continues its own frames.

Frame-sequential sampling denoises frame f next to the finished frames 0..f-1 at t = 0. The data make
that context decisive: each video is one random colour held still over space and time, so frame 0 is a
draw from N(0, I) and every later frame must copy it. Two tiny block-causal models train on the
trainer's own inputs (prepare_micro_batch) for the same steps, one with flow.per_frame_timesteps and
a clean prefix, one with a single timestep per video (flow.causal_per_sample_timesteps, the opt-out).
Frames drawn independently would drift by sqrt(2) of a frame's norm; the untrained model drifts 1.46.
Measured here (3 seeds, 300 steps): per-frame 0.21 to 0.24, per-sample 0.55 to 0.73.
"""

from __future__ import annotations

import torch

from pipeline.config import FlowConfig
from pipeline.models.configs import DiTConfig
from pipeline.models.dit import PoMDiT
from pipeline.models.flow import flow_matching_loss
from pipeline.models.sampler import SamplerConfig, initial_noise, sample_sequential
from pipeline.parallel.dims import ParallelDims
from pipeline.train.inputs import prepare_micro_batch

CHANNELS, FRAMES, SIZE, BATCH, STEPS = 4, 6, 4, 32, 300
ONE_PROCESS = ParallelDims(dp=1, sp=1, world_size=1, rank=0, build_groups=False)


def still_colour_videos(batch: int, generator: torch.Generator) -> torch.Tensor:
    colour = torch.randn(batch, CHANNELS, 1, 1, 1, generator=generator)
    return colour.expand(batch, CHANNELS, FRAMES, SIZE, SIZE).contiguous()


def train_causal_model(flow: FlowConfig) -> PoMDiT:
    torch.manual_seed(0)
    model = PoMDiT(DiTConfig(in_channels=CHANNELS, patch_size=2, width=64, depth=2, text_dim=8, causal=True))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    data = torch.Generator().manual_seed(1)
    text, text_mask = torch.ones(BATCH, 1, 8), torch.ones(BATCH, 1, dtype=torch.bool)
    for step in range(STEPS):
        batch = prepare_micro_batch(still_colour_videos(BATCH, data), text, text_mask, positions=list(range(BATCH)),
                                    step=step, seed=3, flow=flow, patch_t=1, patch_size=2, null_text=None,
                                    null_mask=None, dims=ONE_PROCESS, dtype=torch.float32)
        local = batch.local
        prediction = model(local.latents, local.timesteps, batch.text, batch.text_mask)
        loss = flow_matching_loss(prediction, local.extras["target"], batch.loss_frame_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def drift_from_first_frame(model: PoMDiT) -> float:
    """Mean over videos of |frames 1.. - frame 0| / |frame 0|, sampled frame by frame."""
    text, text_mask = torch.ones(BATCH, 1, 8), torch.ones(BATCH, 1, dtype=torch.bool)
    noise = initial_noise((BATCH, CHANNELS, FRAMES, SIZE, SIZE), seed=7)
    with torch.no_grad():
        video = sample_sequential(model, noise, text, text_mask, config=SamplerConfig(steps=20, guidance=1.0))
    first, later = video[:, :, :1].expand_as(video[:, :, 1:]), video[:, :, 1:]
    return ((later - first).flatten(1).norm(dim=1) / first.flatten(1).norm(dim=1)).mean().item()


def test_per_frame_timesteps_teach_a_causal_model_to_continue_its_frames():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        forcing = train_causal_model(FlowConfig(per_frame_timesteps=True, clean_prefix_prob=0.5, caption_dropout=0.0))
        per_video = train_causal_model(FlowConfig(causal_per_sample_timesteps=True, caption_dropout=0.0))
    finally:
        torch.set_num_threads(threads)
    forcing_drift, per_video_drift = drift_from_first_frame(forcing), drift_from_first_frame(per_video)
    assert forcing_drift < 0.35, f"per-frame timesteps: sampled frames drift {forcing_drift:.2f} from frame 0"
    assert forcing_drift < 0.6 * per_video_drift, (
        f"per-frame timesteps drift {forcing_drift:.2f}, one timestep per video {per_video_drift:.2f}")
