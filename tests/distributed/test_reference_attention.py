"""The reference Ulysses and Ring attention layers of the communication benchmark are real
sequence-parallel attention: on 3 gloo ranks their output and gradients equal single-device
attention, and the bytes they move equal the formulas of docs/sequence_parallel.md."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.parallel.collectives import CommCounter
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.reference_attention import RingAttention, UlyssesAttention
from tests.distributed.harness import relative_error, run_distributed

BATCH, TOKENS, WIDTH, HEADS = 2, 24, 48, 6
LAYERS = {"ulysses": UlyssesAttention, "ring": RingAttention}


def _single_device(layer, x):
    b, n, d = x.shape
    q, k, v = layer.qkv(x).view(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)  # (B, h, N, d/h)
    return layer.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


def attention_worker(rank: int, world_size: int) -> dict:
    dims = ParallelDims(dp=1, sp=world_size)
    results = {}
    for name, cls in LAYERS.items():
        torch.manual_seed(0)
        counter = CommCounter()
        layer = cls(WIDTH, HEADS, dims.sp_group, counter=counter, layer=name)
        reference = cls(WIDTH, HEADS, group=None)
        reference.load_state_dict(layer.state_dict())
        x = torch.randn(BATCH, TOKENS, WIDTH, generator=torch.Generator().manual_seed(1), requires_grad=True)
        weight = torch.randn(BATCH, TOKENS, WIDTH, generator=torch.Generator().manual_seed(2))
        n = TOKENS // world_size
        local_x = x.detach()[:, rank * n:(rank + 1) * n].clone().requires_grad_(True)
        out = layer(local_x)  # (B, N/P, D)
        (out * weight[:, rank * n:(rank + 1) * n]).sum().backward()
        for p in layer.parameters():  # the objective is the sum of the ranks' losses
            dist.all_reduce(p.grad, group=dims.sp_group)
        expected = _single_device(reference, x)
        (expected * weight).sum().backward()
        local = slice(rank * n, (rank + 1) * n)
        grads = [relative_error(p.grad, q.grad) for p, q in zip(layer.parameters(), reference.parameters())]
        results[name] = {"out": relative_error(out.detach(), expected.detach()[:, local]),
                         "input_grad": relative_error(local_x.grad, x.grad[:, local]), "grad": max(grads),
                         "bytes": counter.bytes(), "forward": counter.bytes(direction="forward"),
                         "calls": counter.calls()}
        # The benchmark's O(N) stand-in for the local math issues the same collectives.
        stand_in = CommCounter()
        layer = cls(WIDTH, HEADS, dims.sp_group, counter=stand_in, layer=name, exact=False)
        layer(local_x.detach().requires_grad_(True)).sum().backward()
        results[name]["stand_in"] = [(r.op, r.direction, r.payload_bytes) for r in stand_in.records]
        results[name]["records"] = [(r.op, r.direction, r.payload_bytes) for r in counter.records]
    return results


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_distributed(attention_worker, 3)


@pytest.mark.parametrize("name", list(LAYERS))
def test_reference_attention_equals_single_device(per_rank, name):
    for rank, results in enumerate(per_rank):
        r = results[name]
        for key in ("out", "input_grad", "grad"):
            assert r[key] < 1e-5, f"rank {rank}: {key} relative error {r[key]:.2e}"


def test_reference_attention_bytes_match_formulas(per_rank):
    p, element = 3, 4
    ulysses = per_rank[0]["ulysses"]
    assert ulysses["bytes"] == 8 * BATCH * (TOKENS // p) * WIDTH * element  # Q, K, V, O both ways
    assert ulysses["calls"] == 8 and ulysses["forward"] == ulysses["bytes"] // 2
    ring = per_rank[0]["ring"]
    assert ring["bytes"] == 6 * BATCH * TOKENS * WIDTH * (p - 1) // p * element
    assert ring["forward"] == ring["bytes"] // 3  # K/V once forward; K/V and their gradients backward
    assert ring["calls"] == 3 * (p - 1)
    for name in LAYERS:
        assert per_rank[0][name]["stand_in"] == per_rank[0][name]["records"]
