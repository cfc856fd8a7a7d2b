"""dp=2 x sp=2 on 4 processes: each SP group trains on its own sample; the outputs and the averaged
gradients equal the single-process run over both samples, with either way DeepSpeed may average
(over all dp*sp ranks, or over the DP group plus our SP sum), using `deepspeed_loss_factor`."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from pipeline.models.flow import flow_matching_loss
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.loss import (
    average_gradients_over_dp,
    deepspeed_loss_factor,
    loss_for_logging,
    sequence_parallel_loss,
    sum_gradients_over_sp,
)
from pipeline.parallel.parallelize import parallelize_pom_dit, shard_batch
from tests.distributed.harness import relative_error, run_distributed, tiny_dit, tiny_inputs

CASES = [(causal, averaging) for causal in (False, True) for averaging in ("world", "dp")]


def _emulate_deepspeed_world_average(model: torch.nn.Module) -> None:
    # What a data-parallel group spanning all dp * sp ranks does: average over every rank.
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def _case(dims: ParallelDims, causal: bool, averaging: str, seed: int) -> dict:
    model = tiny_dit(causal=causal, seed=seed)
    reference = copy.deepcopy(model)
    x = tiny_inputs(batch=2, frames=5, seed=seed + 1, causal=causal, mask_last_frame=True)
    d = dims.dp_rank  # this SP group's sample
    mine = {k: (None if v is None else v[d:d + 1]) for k, v in x.items()}

    parallelize_pom_dit(model, dims)
    local = shard_batch(mine["latents"], dims, frame_mask=mine["frame_mask"], timesteps=mine["timesteps"],
                        target=mine["target"])
    out = model(local.latents, local.timesteps, mine["text"], mine["text_mask"], local.shard.frame_mask,
                local.shard.frame_offset)
    loss = sequence_parallel_loss(out, local.extras["target"], local.shard)
    (loss * deepspeed_loss_factor(dims, averaging)).backward()
    if averaging == "world":
        _emulate_deepspeed_world_average(model)
    else:
        sum_gradients_over_sp(model.parameters(), dims)
        average_gradients_over_dp(model.parameters(), dims)

    logged = loss_for_logging(loss, dims)
    ref_out = reference(x["latents"], x["timesteps"], x["text"], x["text_mask"], x["frame_mask"])
    ref_loss = flow_matching_loss(ref_out, x["target"], x["frame_mask"])
    ref_loss.backward()
    local_ref = local.shard.shard(ref_out.detach()[d:d + 1], dim=2)  # this rank's frames of its sample
    shard = local.shard  # compare the video's frames; the padding past its end holds arbitrary values
    valid = torch.arange(shard.local_token_frames) + shard.frame_offset < shard.token_frames
    grads = [relative_error(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters())]
    return {"out": relative_error(out.detach()[:, :, valid], local_ref[:, :, valid]), "grad": max(grads),
            "loss": relative_error(logged, ref_loss.detach())}


def dp_sp_worker(rank: int, world_size: int) -> dict:
    dims = ParallelDims(dp=2, sp=2)
    return {f"{c}-{a}": _case(dims, c, a, 300 + i) for i, (c, a) in enumerate(CASES)}


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_distributed(dp_sp_worker, 4)


@pytest.mark.parametrize("causal,averaging", CASES)
def test_dp2_sp2_equals_single_process(per_rank, causal, averaging):
    for rank, results in enumerate(per_rank):
        r = results[f"{causal}-{averaging}"]
        assert r["out"] < 1e-5, f"rank {rank}: output relative error {r['out']:.2e}"
        assert r["grad"] < 1e-5, f"rank {rank}: gradient relative error {r['grad']:.2e}"
        assert r["loss"] < 1e-5, f"rank {rank}: logged loss relative error {r['loss']:.2e}"
