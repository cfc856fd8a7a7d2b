"""Compiled blocks under sequence parallelism (sp=2, gloo): the SP reducer is left out of the graph on
purpose (torch.compiler.disable), the rest compiles; output and gradients equal the eager sharded run.
One spawn for both cases (inductor compiles are slow on this CPU)."""

from __future__ import annotations

import pytest

from pipeline.parallel.dims import ParallelDims
from tests.compile_cases import CASES, check, compiled_vs_eager
from tests.distributed.harness import run_distributed

SP2 = [name for name, (_, _, sp, _) in CASES.items() if sp == 2]


def compile_worker(rank: int, world_size: int) -> dict:
    dims = ParallelDims(dp=1, sp=world_size)
    return {name: compiled_vs_eager(dims, *CASES[name][:2], CASES[name][3]) for name in SP2}


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_distributed(compile_worker, 2)


@pytest.mark.parametrize("case", SP2)
def test_compiled_sharded_dit_trains_like_eager(per_rank, case):
    for results in per_rank:
        check(results[case])
