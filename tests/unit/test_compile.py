"""torch.compile (inductor, CPU): a PoM layer compiles as one graph (fullgraph=True) with its
recomputing backward, and a tiny DiT whose blocks compile as one graph each (fullgraph=True: v1 and v2
PoM layers, cross and self, masked and block-causal) trains like the eager one (sp=1 here; sp=2 in
tests/distributed/test_sp_compile.py). Inductor is slow on 2 cores: the v1 layer is covered inside
the v1 DiT block rather than compiled alone."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.compile import compile_blocks
from pipeline.models.pom import PoM
from pipeline.parallel.dims import ParallelDims
from tests.compile_cases import CASES, check, compiled_vs_eager


def test_pom_layer_compiles_as_one_graph():
    torch.manual_seed(0)
    layer = PoM(16, 2, 2, "v2", n_sel_heads=4)
    x = torch.randn(2, 12, 16, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False  # a padded last frame
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):  # fullgraph: a graph break is an error
        x.grad = None
        layer.zero_grad()
        out = fn(x, context_mask=mask, frame_tokens=4)
        out.square().sum().backward()
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [name for name, (_, _, sp, _) in CASES.items() if sp == 1])
def test_compiled_dit_trains_like_eager(case):
    variant, causal, _, checkpointing = CASES[case]
    # One device: no reducer to leave out, so a graph break anywhere in a block is an error.
    check(compiled_vs_eager(ParallelDims(dp=1, sp=1), variant, causal, checkpointing, fullgraph=True))


def test_compile_blocks_is_off_unless_enabled_and_needs_blocks():
    class NoBlocks(torch.nn.Module):
        pass

    model = NoBlocks()
    assert compile_blocks(model, False) is model
    with pytest.raises(TypeError, match="needs a model with .blocks"):
        compile_blocks(model, True)
