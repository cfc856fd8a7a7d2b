"""Compiled (inductor) against eager training steps of the tiny PoM DiT, shared by the sp=1 unit test
and the sp=2 distributed test (tests/unit/test_compile.py, tests/distributed/test_sp_compile.py).

Inductor compiles on this CPU take tens of seconds per graph, so the cases are few and chosen to
cover each dimension twice across sp=1 and sp=2: v1 and v2, block-causal and bidirectional, every
case with a padded token-frame (a masked state) and a text mask.
"""

from __future__ import annotations

import copy

from pipeline.models.compile import compile_blocks
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.loss import sequence_parallel_loss
from pipeline.parallel.parallelize import parallelize_pom_dit, shard_batch
from tests.distributed.harness import relative_error, tiny_dit, tiny_inputs

CASES = {  # name: (variant, causal, sp, activation checkpointing)
    "v1-causal-masked-sp1": ("v1", True, 1, False),
    "v2-bidirectional-masked-checkpointing-sp1": ("v2", False, 1, True),
    "v1-bidirectional-masked-sp2": ("v1", False, 2, False),
    "v2-causal-masked-sp2": ("v2", True, 2, False),
}


def compiled_vs_eager(dims: ParallelDims, variant: str, causal: bool, checkpointing: bool = False, seed: int = 5,
                      **compile_options) -> dict:
    """One forward + backward of the same sharded model, eager and with compiled blocks; the
    relative errors of the output and of the worst parameter gradient (this rank's, local)."""
    options = {"n_sel_heads": 4} if variant == "v2" else {}
    eager = tiny_dit(causal=causal, seed=seed, variant=variant, **options)
    compiled = copy.deepcopy(eager)
    results = []
    for model, compile_it in ((eager, False), (compiled, True)):
        model.set_activation_checkpointing(checkpointing)  # the trainer's order: checkpointing, SP, compile
        parallelize_pom_dit(model, dims)
        compile_blocks(model, compile_it, **compile_options)  # last, as the trainer does
        x = tiny_inputs(batch=2, frames=4, seed=seed + 1, causal=causal, mask_last_frame=True)
        local = shard_batch(x["latents"], dims, frame_mask=x["frame_mask"], timesteps=x["timesteps"],
                            target=x["target"])
        out = model(local.latents, local.timesteps, x["text"], x["text_mask"], local.shard.frame_mask,
                    local.shard.frame_offset)
        sequence_parallel_loss(out, local.extras["target"], local.shard).backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_e, grads_e), (out_c, grads_c) = results
    errors = {n: relative_error(grads_c[n], grads_e[n]) for n in grads_e}
    worst = max(errors, key=errors.get)
    compiled_blocks = sum(getattr(b, "_compiled_call_impl", None) is not None for b in compiled.blocks)
    return {"out": relative_error(out_c, out_e), "grad": errors[worst], "worst": worst,
            "zero_grads": [n for n, g in grads_e.items() if not g.abs().sum() > 0],
            "compiled_blocks": compiled_blocks, "blocks": len(compiled.blocks)}


def check(result: dict) -> None:
    assert result["compiled_blocks"] == result["blocks"]
    assert result["out"] < 1e-5, f"output relative error {result['out']:.2e}"
    assert result["grad"] < 1e-4, f"gradient of {result['worst']}: relative error {result['grad']:.2e}"
    assert result["zero_grads"] == [], f"parameters without gradient: {result['zero_grads']}"
