"""torch.compile of a PoM DiT, block by block, as large training code bases do (torchtitan compiles
each transformer block): one compiled graph per block shape, reused by every block, instead of one
graph of the whole model whose compile time grows with depth.

Call it last, after sequence parallelism (`parallelize_pom_dit`) and activation checkpointing are
applied, so that what is compiled is what runs. `nn.Module.compile` compiles in place: parameter
names, state dicts and checkpoints stay those of the eager model.

Sequence parallelism: the SP reducer's collectives are not traced. `SequenceParallelReducer.reduce`
and `.reduce_causal` are wrapped in `torch.compiler.disable` (pipeline/parallel/reducers.py), so each
self-PoM splits its block's graph at the state reduction, on purpose: the reduction moves B x (S + 1)
numbers, so the split costs a kernel launch, and the eager collective keeps the CommCounter's
per-layer byte records and the hand-written backward collectives exactly as they are uncompiled.
Everything else of the block (features, gates, the Functions' recomputing backward, norms, FFN)
compiles; a PoM layer on one device compiles with fullgraph=True (tests/unit/test_compile.py).
"""

from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, enabled: bool, **compile_options) -> nn.Module:
    """Compile each `model.blocks[i]` in place with torch.compile when `enabled`; returns the model.

    compile_options go to torch.compile (e.g. backend="inductor", fullgraph=False, dynamic=None).
    """
    if not enabled:
        return model
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"compile_blocks needs a model with .blocks (a PoMDiT), got {type(model).__name__}")
    for block in blocks:
        block.compile(**compile_options)
    return model
