"""Sampling with sequence parallelism: one video generated across an SP group of 3 ranks (frames
not divisible by 3, classifier-free guidance, Euler and Heun) equals single-process sampling, on
every rank, for bidirectional and block-causal models."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.models.sampler import SamplerConfig, initial_noise, sample
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.parallelize import parallelize_pom_dit
from pipeline.parallel.sampling import sample_sequence_parallel
from tests.distributed.harness import (
    CHANNELS,
    SIDE,
    TEXT_DIM,
    relative_error,
    run_distributed,
    tiny_dit,
    tiny_inputs,
)

CASES = {"bidirectional-euler": (False, "euler"), "bidirectional-heun": (False, "heun"),
         "causal-euler": (True, "euler"), "v2-bidirectional-euler": (False, "euler"),
         "v2-causal-euler": (True, "euler")}
V2 = dict(variant="v2", n_sel_heads=4)  # the authors' formulation, with selection heads
FRAMES, BATCH = 5, 2


def _count_forwards(model) -> dict:
    """Counts the model's full-sequence forwards and its cached one-frame forwards from now on."""
    calls = {"frame": 0, "full": 0}
    model.register_forward_hook(lambda *_: calls.__setitem__("full", calls["full"] + 1))
    frame_forward = model.forward_frame

    def counted(*args, **kwargs):
        calls["frame"] += 1
        return frame_forward(*args, **kwargs)

    model.forward_frame = counted
    return calls


def sampling_worker(rank: int, world_size: int) -> dict:
    dims = ParallelDims(dp=1, sp=world_size)
    results = {}
    for i, (name, (causal, solver)) in enumerate(CASES.items()):
        model = tiny_dit(causal=causal, seed=40 + i, **(V2 if name.startswith("v2") else {}))
        reference = copy.deepcopy(model)
        x = tiny_inputs(batch=BATCH, frames=FRAMES, seed=50 + i, causal=causal)
        null_text, null_mask = torch.zeros(2, TEXT_DIM), torch.tensor([True, False])
        config = SamplerConfig(steps=3, guidance=2.5, shift=2.0, solver=solver)
        noise = initial_noise((BATCH, CHANNELS, FRAMES, SIDE, SIDE), seed=60 + i)  # same on every rank
        parallelize_pom_dit(model, dims)
        calls = _count_forwards(model)
        video = sample_sequence_parallel(model, noise, x["text"], x["text_mask"], dims=dims, config=config,
                                         null_text=null_text, null_mask=null_mask)
        expected = sample(reference, noise, x["text"], x["text_mask"], config=config, null_text=null_text,
                          null_mask=null_mask)
        results[name] = {"error": relative_error(video, expected), "shape": list(video.shape),
                         "expected_shape": list(expected.shape), "calls": calls}
    return results


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_distributed(sampling_worker, 3)


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_parallel_sampling_equals_one_process(per_rank, case):
    for rank, results in enumerate(per_rank):
        r = results[case]
        assert r["shape"] == r["expected_shape"]
        assert r["error"] < 1e-5, f"rank {rank}: relative error {r['error']:.2e}"


def test_block_causal_sampling_hands_the_state_on_instead_of_recomputing(per_rank):
    """5 token-frames over 3 ranks (2, 2, 1): each rank runs only its own frames through the cached
    one-frame forward (3 Euler steps + 1 pass at t = 0 per frame), never the full-sequence forward."""
    frames_per_rank = [2, 2, 1]
    for rank, results in enumerate(per_rank):
        assert results["causal-euler"]["calls"] == {"frame": frames_per_rank[rank] * (3 + 1), "full": 0}, rank
