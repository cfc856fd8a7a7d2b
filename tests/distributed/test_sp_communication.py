"""The bytes sequence parallelism moves per self-PoM layer per training step equal
2 * B * (state_dim + 1) * bytes per element (one collective forward, one backward) and do not change
when the video has 4x the tokens; clear errors for a bad world size and for sp > frames."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.loss import sequence_parallel_loss
from pipeline.parallel.parallelize import comm_counter, parallelize_pom_dit, shard_batch
from tests.distributed.harness import SIDE, run_distributed, tiny_dit, tiny_inputs

BATCH, STEPS = 3, 2
FRAMES = {"N": 4, "4N": 16}  # token-frames of 4 tokens each: 16 and 64 tokens


def _train_steps(dims: ParallelDims, causal: bool, frames: int) -> dict:
    model = tiny_dit(causal=causal, seed=7)
    parallelize_pom_dit(model, dims)
    counter = comm_counter(model)
    for step in range(STEPS):
        x = tiny_inputs(batch=BATCH, frames=frames, seed=step, causal=causal)
        local = shard_batch(x["latents"], dims, timesteps=x["timesteps"], target=x["target"])
        out = model(local.latents, local.timesteps, x["text"], x["text_mask"], local.shard.frame_mask,
                    local.shard.frame_offset)
        sequence_parallel_loss(out, local.extras["target"], local.shard).backward()
        counter.next_step()
    tokens_per_frame = (SIDE // model.config.patch_size) ** 2
    return {"per_step": [counter.per_layer(step) for step in range(STEPS)],
            "ops": sorted({r.op for r in counter.records}),
            "state_dim": model.blocks[0].self_pom.state_dim, "tokens": frames * tokens_per_frame,
            "self_pom_layers": [f"blocks.{i}.self_pom" for i in range(len(model.blocks))]}


def _error(make) -> str:
    try:
        make()
    except ValueError as error:
        return str(error)
    return ""


def communication_worker(rank: int, world_size: int) -> dict:
    dims = ParallelDims(dp=1, sp=world_size)
    runs = {f"{'causal' if causal else 'bidirectional'}-{size}": _train_steps(dims, causal, frames)
            for causal in (False, True) for size, frames in FRAMES.items()}
    # A copy of a parallelized model (the trainer's EMA) shares the groups and gives the same output.
    model = parallelize_pom_dit(tiny_dit(causal=True, seed=3), dims)
    copied = copy.deepcopy(model)
    x = tiny_inputs(batch=1, frames=4, seed=4, causal=True)
    local = shard_batch(x["latents"], dims, timesteps=x["timesteps"])
    args = (local.latents, local.timesteps, x["text"], x["text_mask"], local.shard.frame_mask,
            local.shard.frame_offset)
    same_copy = bool(torch.equal(model(*args), copied(*args)))
    one_frame = torch.zeros(1, 4, 1, SIDE, SIDE)
    errors = {
        "world": _error(lambda: ParallelDims(dp=2, sp=world_size)),
        "frames": _error(lambda: shard_batch(one_frame, dims)),
        "check_frames": _error(lambda: dims.check_frames(1)),
    }
    return {"runs": runs, "errors": errors, "same_copy": same_copy}


@pytest.fixture(scope="module")
def measured() -> dict:
    return run_distributed(communication_worker, 2)[0]


@pytest.mark.parametrize("causal", ["bidirectional", "causal"])
def test_bytes_per_layer_per_step_match_formula_and_do_not_grow_with_tokens(measured, causal):
    small, large = measured["runs"][f"{causal}-N"], measured["runs"][f"{causal}-4N"]
    assert large["tokens"] == 4 * small["tokens"]
    element = torch.finfo(torch.float32).bits // 8
    formula = 2 * BATCH * (small["state_dim"] + 1) * element
    for run in (small, large):
        assert run["ops"] == (["all_gather"] if causal == "causal" else ["all_reduce"])
        for per_layer in run["per_step"]:
            assert sorted(per_layer) == run["self_pom_layers"]  # cross-PoM issues nothing
            for layer, counts in per_layer.items():
                assert counts["forward"] + counts["backward"] == formula, layer
                assert counts["forward"] == counts["backward"] and counts["calls"] == 2, layer
    assert small["per_step"] == large["per_step"]


def test_clear_errors(measured):
    errors = measured["errors"]
    assert "dp=2" in errors["world"] and "sp=2" in errors["world"] and "world size 2" in errors["world"]
    for key in ("frames", "check_frames"):
        assert "sp=2 is larger than the number of latent token-frames 1" in errors[key]


def test_a_copy_of_the_parallel_model_still_works(measured):
    assert measured["same_copy"]
