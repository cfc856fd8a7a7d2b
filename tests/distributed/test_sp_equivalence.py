"""Sequence parallelism is exact: for P in {2, 3, 4} ranks (gloo), frames divisible by P and not,
batch 1 and 3, a text mask, bidirectional and block-causal, the sharded DiT's output and every
parameter gradient (SP loss weighting, gradients summed over the SP group) equal one process's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from pipeline.models.flow import flow_matching_loss
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.loss import sequence_parallel_loss, sum_gradients_over_sp
from pipeline.parallel.parallelize import comm_counter, parallelize_pom_dit, shard_batch
from pipeline.parallel.sharding import gather_frames
from tests.distributed.harness import relative_error, run_distributed, tiny_dit, tiny_inputs

TOLERANCE = 1e-5


def cases_for(sp: int) -> dict[str, dict]:
    cases = {}
    for frames_kind, frames in (("divisible", 2 * sp), ("not_divisible", sp + 1)):
        for batch in (1, 3):
            for causal in (False, True):
                name = f"{frames_kind}-b{batch}-{'causal' if causal else 'bidirectional'}"
                cases[name] = dict(frames=frames, batch=batch, causal=causal)
    if sp == 2:  # a few variations once: the other PoM formulation, temporal patches, checkpointing
        cases["v2-causal"] = dict(frames=3, batch=3, causal=True, variant="v2")
        cases["v2-heads-grouped-bidirectional"] = dict(frames=3, batch=3, causal=False, variant="v2",
                                                       options=dict(n_sel_heads=4, n_groups=2))
        cases["patch_t2-not_divisible"] = dict(frames=6, batch=3, causal=True, patch_t=2)
        cases["checkpointing-bidirectional"] = dict(frames=3, batch=3, causal=False, checkpointing=True)
    return cases


def _case(dims: ParallelDims, seed: int, *, frames: int, batch: int, causal: bool, variant: str = "v1",
          patch_t: int = 1, checkpointing: bool = False, options: dict | None = None) -> dict | None:
    model = tiny_dit(causal=causal, seed=seed, variant=variant, patch_t=patch_t, **(options or {}))
    reference = copy.deepcopy(model)
    x = tiny_inputs(batch=batch, frames=frames, seed=seed + 1, causal=causal, patch_t=patch_t,
                    mask_last_frame=True)
    # Block-causal training may drop the clean prefix from the loss: exercise a loss mask that
    # differs from the state mask.
    loss_mask = (x["timesteps"] > 0.2) if causal else None

    # Sharded: each rank its token-frames, the SP loss, gradients summed over the SP group.
    parallelize_pom_dit(model, dims)
    model.set_activation_checkpointing(checkpointing)
    local = shard_batch(x["latents"], dims, patch_t=patch_t, frame_mask=x["frame_mask"],
                        timesteps=x["timesteps"], target=x["target"])
    out = model(local.latents, local.timesteps, x["text"], x["text_mask"], local.shard.frame_mask,
                local.shard.frame_offset)  # (B, C, T_local, H, W)
    loss = sequence_parallel_loss(out, local.extras["target"], local.shard, loss_frame_mask=loss_mask)
    loss.backward()
    sum_gradients_over_sp(model.parameters(), dims)
    full_out = gather_frames(out.detach(), local.shard, dims.sp_group)
    total_loss = loss.detach().clone()
    dist.all_reduce(total_loss, group=dims.sp_group)
    calls = sum(v["calls"] for v in comm_counter(model).per_layer().values())
    if dims.rank != 0:
        return None

    ref_out = reference(x["latents"], x["timesteps"], x["text"], x["text_mask"], x["frame_mask"])
    mask = x["frame_mask"] if x["frame_mask"] is not None else torch.ones(batch, frames // patch_t, dtype=torch.bool)
    ref_loss = flow_matching_loss(ref_out, x["target"], mask if loss_mask is None else mask & loss_mask)
    ref_loss.backward()
    grads = {}
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        grads[name] = relative_error(p.grad, q.grad)
    zero = [name for name, q in reference.named_parameters() if not q.grad.abs().sum() > 0]
    worst = max(grads, key=grads.get)
    return {"out": relative_error(full_out, ref_out.detach()), "loss": relative_error(total_loss, ref_loss.detach()),
            "grad": grads[worst], "worst_param": worst, "params": len(grads), "zero_grads": zero,
            "calls": calls, "depth": len(model.blocks)}


def equivalence_worker(rank: int, world_size: int, cases: dict[str, dict]) -> dict:
    dims = ParallelDims(dp=1, sp=world_size)
    return {name: _case(dims, 100 + i, **case) for i, (name, case) in enumerate(cases.items())}


_RESULTS: dict[int, dict] = {}


def results(sp: int) -> dict:
    # One spawn per degree for all its cases (spawning costs seconds); rank 0 holds the comparisons.
    if sp not in _RESULTS:
        _RESULTS[sp] = run_distributed(equivalence_worker, sp, cases_for(sp))[0]
    return _RESULTS[sp]


@pytest.mark.parametrize("sp,case", [(sp, case) for sp in (2, 3, 4) for case in cases_for(sp)])
def test_sharded_dit_equals_single_process(sp, case):
    r = results(sp)[case]
    assert r["out"] < TOLERANCE, f"output relative error {r['out']:.2e}"
    assert r["loss"] < TOLERANCE, f"summed SP loss relative error {r['loss']:.2e}"
    assert r["grad"] < TOLERANCE, f"gradient of {r['worst_param']}: relative error {r['grad']:.2e}"
    assert r["zero_grads"] == [], f"parameters without gradient make the check empty: {r['zero_grads']}"
    assert r["params"] > 20
    # One collective per self-PoM layer forward and one backward (checkpointing recomputes forward).
    expected_calls = r["depth"] * (3 if case.startswith("checkpointing") else 2)
    assert r["calls"] == expected_calls
