"""Reference sequence-parallel attention layers, to measure what PoM-SP is compared against.

Small but real implementations of the two usual schemes for attention, issuing their real
collectives through pipeline/parallel/collectives.py (so the CommCounter measures them):

- DeepSpeed-Ulysses: all-to-all of Q, K and V from (sequence-sharded, all heads) to (all tokens,
  heads-sharded), local attention, all-to-all of the output back. Backward: the four inverse
  all-to-alls. Per layer per step: 8 * B * (N / P) * D elements.
- Ring attention: each rank keeps its queries; the K/V blocks travel around the ring (P - 1 hops),
  each block's attention merged with log-sum-exp. Backward: the K/V blocks travel again (P - 1 hops)
  with their gradient accumulators (P - 1 hops). Per layer per step: 6 * B * N * D * (P - 1) / P.

Local attention uses PyTorch's CPU flash-attention kernels, which return the log-sum-exp ring
attention needs; these layers are for CPU benchmarks and tests (tests/distributed), not training.
Both are tested against single-device attention.

`exact=False` swaps only the local attention math for an O(N) stand-in of the same shapes (the
output is V; the gradients flow to Q, K and V) so that a CPU benchmark can reach long sequences: the
collectives, their tensors and their order are unchanged, so the bytes measured are the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pipeline.parallel.collectives import BACKWARD, CommCounter, all_to_all, ring_exchange

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _Attention(nn.Module):
    """QKV projection, attention over all tokens of the group, output projection."""

    def __init__(self, dim: int, heads: int, group, *, counter: CommCounter | None = None, layer: str = "",
                 exact: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be a multiple of heads {heads}")
        self.heads, self.group, self.counter, self.layer = heads, group, counter, layer
        self.exact = exact
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor):
        b, n, d = x.shape
        return self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(dim=2)  # 3 x (B, n, h, d/h)


class UlyssesAttention(_Attention):
    """x (B, N / P, D) this rank's tokens -> (B, N / P, D). Needs heads divisible by P."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        p = dist.get_world_size(self.group)
        if self.heads % p:
            raise ValueError(f"Ulysses needs heads ({self.heads}) divisible by the SP degree {p}")
        kw = {"counter": self.counter, "layer": self.layer}
        # (B, N/P, h, d/h) -> (B, N, h/P, d/h): scatter heads (dim 2), gather tokens (dim 1).
        q, k, v = (all_to_all(t, 2, 1, self.group, **kw) for t in self._qkv(x))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h/P, N, d/h)
        if self.exact:
            o = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, h/P, N, d/h)
        else:
            o = v + 0 * (q + k)  # the stand-in: same shapes and graph, O(N)
        o = o.transpose(1, 2)  # (B, N, h/P, d/h)
        o = all_to_all(o.contiguous(), 1, 2, self.group, **kw)  # (B, N/P, h, d/h)
        return self.out(o.reshape(b, n, d))


class RingAttention(_Attention):
    """x (B, N / P, D) this rank's tokens -> (B, N / P, D); K/V passed around the ring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.transpose(1, 2).contiguous() for t in self._qkv(x))  # (B, h, N/P, d/h)
        o = _RingAttentionFn.apply(q, k, v, self.group, self.counter, self.layer, self.exact)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


def _stand_in(q, k, v):
    return v.clone(), torch.zeros(q.shape[:-1], dtype=q.dtype)  # output V, log-sum-exp 0


def _stand_in_backward(grad_out, q, k, v, out, lse, dropout, causal):
    return torch.zeros_like(q), torch.zeros_like(k), grad_out.clone()


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, counter, layer, exact):
        p = dist.get_world_size(group)
        attend = _flash if exact else _stand_in
        kv = torch.stack([k, v])  # (2, B, h, n, d/h): one message per hop
        out, lse = attend(q, kv[0], kv[1])  # own block: (B, h, n, d/h), (B, h, n)
        for _ in range(p - 1):
            kv = ring_exchange(kv, group, counter=counter, layer=layer)
            block_out, block_lse = attend(q, kv[0], kv[1])
            # Merge two softmax-normalised partial results by their log-sum-exps.
            new_lse = torch.logaddexp(lse, block_lse)
            out = out * (lse - new_lse).exp().unsqueeze(-1) + block_out * (block_lse - new_lse).exp().unsqueeze(-1)
            lse = new_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.counter, ctx.layer, ctx.exact = group, counter, layer, exact
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group, p, kw = ctx.group, dist.get_world_size(ctx.group), {"counter": ctx.counter, "layer": ctx.layer}
        grad_out = grad_out.contiguous()

        attend_backward = _flash_backward if ctx.exact else _stand_in_backward

        def block_grads(kv):  # exact block gradients given the global output and log-sum-exp
            return attend_backward(grad_out, q, kv[0], kv[1], out, lse, 0.0, False)

        dq, dk_own, dv_own = block_grads(torch.stack([k, v]))
        kv, travelling = torch.stack([k, v]), None  # travelling: gradient of the block held, so far
        for _step in range(1, p):
            kv = ring_exchange(kv, group, direction=BACKWARD, **kw)  # block of rank (r - _step)
            dq_s, dk_s, dv_s = block_grads(kv)
            dq = dq + dq_s
            mine = torch.stack([dk_s, dv_s])
            if travelling is None:
                travelling = mine
            else:  # the accumulator of this block comes from the previous rank, one hop behind
                travelling = ring_exchange(travelling, group, direction=BACKWARD, **kw) + mine
        if travelling is not None:  # last hop: block (r + 1)'s accumulator reaches its owner
            travelling = ring_exchange(travelling, group, direction=BACKWARD, **kw)
            dk_own, dv_own = dk_own + travelling[0], dv_own + travelling[1]
        return dq, dk_own, dv_own, None, None, None, None
