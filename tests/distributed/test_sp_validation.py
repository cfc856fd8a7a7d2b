"""Validation samples with sequence parallelism: over an SP group of 2 (frames sharded, the EMA broadcast
from rank 0 only) it gives the latents single-process validation gives for the same seed, for a
bidirectional and a block-causal PoM DiT."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import CHANNELS, SIDE, TEXT_DIM, relative_error, run_distributed, tiny_dit


def _validator(model_config, dims):
    from pipeline.config import get_recipe
    from pipeline.config_overrides import apply_overrides
    from pipeline.train.conditioning import Conditioning
    from pipeline.train.validation import Validator

    config = apply_overrides(get_recipe("debug"), ["validation.steps=3", "validation.guidance=2.0",
                                                   "validation.seed=5"])
    g = torch.Generator().manual_seed(3)
    val_mask = torch.ones(2, 4, dtype=torch.bool)
    val_mask[1, 2:] = False
    cond = Conditioning(null_text=torch.randn(1, TEXT_DIM, generator=g), null_mask=torch.ones(1, dtype=torch.bool),
                        val_text=torch.randn(2, 4, TEXT_DIM, generator=g), val_mask=val_mask,
                        val_shapes=[(CHANNELS, 4, SIDE, SIDE), (CHANNELS, 6, SIDE, SIDE)], val_captions=["a", "b"])
    return Validator(config, model_config, cond, manifest={}, output_dir="unused", device=torch.device("cpu"),
                     dims=dims)


def _worker(rank: int, world: int) -> dict:
    from pipeline.parallel.dims import ParallelDims

    out = {}
    for causal in (False, True):
        model = tiny_dit(causal=causal, seed=11)
        state = {k: v.detach().clone() for k, v in model.named_parameters()}
        sharded = _validator(model.config, ParallelDims(dp=1, sp=world)).sample_latents(state if rank == 0 else None)
        single = _validator(model.config, None).sample_latents(state)
        out["causal" if causal else "bidirectional"] = [relative_error(a, b) for a, b in zip(sharded, single)]
    return out


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_distributed(_worker, 2)


@pytest.mark.parametrize("kind", ["bidirectional", "causal"])
def test_sp_validation_equals_single_process_validation(per_rank, kind):
    for rank, result in enumerate(per_rank):
        assert len(result[kind]) == 2 and max(result[kind]) < 1e-5, f"rank {rank}: {result[kind]}"
