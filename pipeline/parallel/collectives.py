"""Autograd-aware collectives for sequence parallelism, and the counter of the bytes they move.

Every collective issued by our sequence parallelism goes through this file and is recorded in a
`CommCounter` (when one is given), per layer, per step and per direction (aggregated, in constant
memory), so that "the communication of PoM-SP is constant in the number of tokens" is a measurement.

What a record counts: `payload_bytes` is the size of the tensor this rank contributes to the
collective (the all-reduce buffer, the all-gather input, the all-to-all input, the tensor sent). This
is the usual "message size" and the unit of the formulas in docs/sequence_parallel.md. `wire_bytes`
is the estimate of what this rank actually puts on the wire with the standard algorithms (ring
all-reduce 2(P-1)/P x payload, ring all-gather (P-1) x payload, all-to-all (P-1)/P x payload, send
1 x payload).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

FORWARD, BACKWARD = "forward", "backward"


@dataclass(frozen=True, kw_only=True)
class CommRecord:
    """One collective issued by one rank."""

    step: int
    """Training (or sampling) step index at the time of the call; see `CommCounter.next_step`."""

    layer: str
    """Module path of the layer that issued it, e.g. "blocks.3.self_pom"."""

    direction: str
    """"forward" or "backward" (the autograd pass that issued it)."""

    op: str
    """"all_reduce", "all_gather", "all_to_all" or "send"."""

    payload_bytes: int
    """Bytes of the tensor this rank contributes (see the module docstring)."""

    group_size: int
    """Number of ranks in the collective's group."""

    calls: int = 1
    """Collectives aggregated in this record (same step, layer, direction, op and group size);
    `payload_bytes` is their sum."""

    @property
    def wire_bytes(self) -> float:
        """Estimate of the bytes this rank sends with the standard algorithm of `op`."""
        p = self.group_size
        factor = {"all_reduce": 2 * (p - 1) / p, "all_gather": p - 1, "all_to_all": (p - 1) / p, "send": 1}
        return self.payload_bytes * factor[self.op]


class CommCounter:
    """Counts the collectives of sequence parallelism in constant memory; call `next_step()` after each step.

    Calls are aggregated per (step, layer, direction, op, group size): one record per layer, direction and
    op of a step, whatever the number of micro-batches. Only the last `keep_steps` steps are kept per step
    (for tests and benchmarks); the totals since the last `take_window()` (the trainer's logging
    interval) are kept per layer, direction and op. A run of any length holds at most
    (keep_steps + 1) x layers x directions x ops aggregates.
    """

    def __init__(self, *, keep_steps: int = 8):
        if keep_steps < 1:
            raise ValueError(f"keep_steps={keep_steps} must be >= 1")
        self.keep_steps = keep_steps
        self.step = 0
        self._steps: dict[int, dict[tuple, list[int]]] = {}  # step -> key -> [payload bytes, calls]
        self._window: dict[tuple, list[int]] = {}  # (layer, direction, op, group size) -> [bytes, calls]
        self._window_steps = 0

    def record(self, *, layer: str, direction: str, op: str, tensor: torch.Tensor, group_size: int) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        key = (layer, direction, op, group_size)
        for table in (self._steps.setdefault(self.step, {}), self._window):
            total = table.setdefault(key, [0, 0])
            total[0] += nbytes
            total[1] += 1

    def next_step(self) -> None:
        """Start counting the next step (call once per training step, after backward)."""
        self.step += 1
        self._window_steps += 1
        while len(self._steps) > self.keep_steps:
            del self._steps[min(self._steps)]

    def reset(self) -> None:
        self._steps.clear()
        self._window.clear()
        self._window_steps = 0
        self.step = 0

    def take_window(self) -> dict[str, float]:
        """Totals since the previous call: {"forward": bytes, "backward": bytes, "calls": n, "steps": n}
        (payload bytes, see the module docstring); starts a new window."""
        out = {FORWARD: 0, BACKWARD: 0, "calls": 0, "steps": self._window_steps}
        for (_, direction, _, _), (nbytes, calls) in self._window.items():
            out[direction] += nbytes
            out["calls"] += calls
        self._window.clear()
        self._window_steps = 0
        return out

    def size(self) -> int:
        """Aggregates held (what the memory of the counter grows with)."""
        return sum(len(table) for table in self._steps.values()) + len(self._window)

    @property
    def records(self) -> list[CommRecord]:
        """The kept steps' aggregates, oldest step first, in the order they were first seen."""
        return [CommRecord(step=step, layer=layer, direction=direction, op=op, payload_bytes=nbytes,
                           group_size=size, calls=calls)
                for step, table in sorted(self._steps.items())
                for (layer, direction, op, size), (nbytes, calls) in table.items()]

    def select(self, *, step: int | None = None, layer: str | None = None,
               direction: str | None = None, op: str | None = None) -> list[CommRecord]:
        return [r for r in self.records
                if (step is None or r.step == step) and (layer is None or r.layer == layer)
                and (direction is None or r.direction == direction) and (op is None or r.op == op)]

    def bytes(self, *, step: int | None = None, layer: str | None = None, direction: str | None = None,
              op: str | None = None, wire: bool = False) -> float:
        """Total payload bytes (or wire estimate) of the matching records."""
        chosen = self.select(step=step, layer=layer, direction=direction, op=op)
        return sum(r.wire_bytes if wire else r.payload_bytes for r in chosen)

    def calls(self, *, step: int | None = None, layer: str | None = None, direction: str | None = None,
              op: str | None = None) -> int:
        """Number of collectives of the matching records."""
        return sum(r.calls for r in self.select(step=step, layer=layer, direction=direction, op=op))

    def per_layer(self, step: int | None = None) -> dict[str, dict[str, int]]:
        """{layer: {"forward": bytes, "backward": bytes, "calls": n}} for one kept step (or all kept steps)."""
        table: dict[str, dict[str, int]] = defaultdict(lambda: {FORWARD: 0, BACKWARD: 0, "calls": 0})
        for r in self.select(step=step):
            table[r.layer][r.direction] += r.payload_bytes
            table[r.layer]["calls"] += r.calls
        return dict(table)


def _group_size(group) -> int:
    return dist.get_world_size(group)


def _note(counter: CommCounter | None, layer: str, direction: str, op: str, tensor: torch.Tensor,
          group) -> None:
    if counter is not None:
        counter.record(layer=layer, direction=direction, op=op, tensor=tensor, group_size=_group_size(group))


# -- all-reduce (bidirectional self-PoM) -------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x, on every rank. Backward: dx = sum over ranks of dy, because every rank's
    output depends on every rank's input (the objective is the sum of all ranks' losses)."""

    @staticmethod
    def forward(ctx, x, group, counter, layer):
        ctx.group, ctx.counter, ctx.layer = group, counter, layer
        y = x.contiguous().clone()
        _note(counter, layer, FORWARD, "all_reduce", y, group)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        _note(ctx.counter, ctx.layer, BACKWARD, "all_reduce", grad, ctx.group)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None, None, None


def all_reduce_sum(x: torch.Tensor, group, *, counter: CommCounter | None = None,
                   layer: str = "") -> torch.Tensor:
    """Differentiable all-reduce (SUM) of x over `group`; one collective forward, one backward."""
    return _AllReduceSum.apply(x, group, counter, layer)


# -- exclusive prefix over ranks (block-causal self-PoM) ------------------------------------------------------


def _gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(_group_size(group))]
    dist.all_gather(parts, x, group=group)
    return parts


class _LowerRanksSum(torch.autograd.Function):
    """y_r = sum_{q < r} x_q (rank r of the group; zeros on rank 0), by one all-gather of x.

    Backward is the mirrored suffix: dx_q = sum_{r > q} dy_r, again one all-gather (of dy)."""

    @staticmethod
    def forward(ctx, x, group, counter, layer):
        ctx.group, ctx.counter, ctx.layer = group, counter, layer
        x = x.contiguous()
        _note(counter, layer, FORWARD, "all_gather", x, group)
        parts = _gather(x, group)
        rank = dist.get_rank(group)
        out = torch.zeros_like(x)
        for part in parts[:rank]:  # fixed order: identical rounding on every rank
            out = out + part
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        _note(ctx.counter, ctx.layer, BACKWARD, "all_gather", grad, ctx.group)
        parts = _gather(grad, ctx.group)
        rank = dist.get_rank(ctx.group)
        out = torch.zeros_like(grad)
        for part in parts[rank + 1:]:
            out = out + part
        return out, None, None, None


def sum_of_lower_ranks(x: torch.Tensor, group, *, counter: CommCounter | None = None,
                       layer: str = "") -> torch.Tensor:
    """Differentiable exclusive prefix over the ranks of `group`: rank r gets x_0 + ... + x_{r-1}."""
    return _LowerRanksSum.apply(x, group, counter, layer)


# -- all-to-all and ring send (reference Ulysses / Ring attention in reference_attention.py) ---------------


class _AllToAll(torch.autograd.Function):
    """Split x into P chunks along `scatter_dim`, send chunk q to rank q, concatenate the received
    chunks along `gather_dim`. Its gradient is the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, counter, layer):
        ctx.dims, ctx.group, ctx.counter, ctx.layer = (scatter_dim, gather_dim), group, counter, layer
        return _all_to_all(x, scatter_dim, gather_dim, group, counter, layer, FORWARD)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        dx = _all_to_all(grad, gather_dim, scatter_dim, ctx.group, ctx.counter, ctx.layer, BACKWARD)
        return dx, None, None, None, None, None


def _all_to_all(x, scatter_dim, gather_dim, group, counter, layer, direction):
    p = _group_size(group)
    inputs = [chunk.contiguous() for chunk in x.chunk(p, dim=scatter_dim)]
    _note(counter, layer, direction, "all_to_all", x, group)
    outputs = [torch.empty_like(chunk) for chunk in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group, *,
               counter: CommCounter | None = None, layer: str = "") -> torch.Tensor:
    """Differentiable all-to-all (DeepSpeed-Ulysses' sequence <-> head exchange)."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group, counter, layer)


def ring_exchange(x: torch.Tensor, group, *, counter: CommCounter | None = None, layer: str = "",
                  direction: str = FORWARD) -> torch.Tensor:
    """Send x to the next rank of the ring and return the tensor received from the previous one.
    Not differentiable: ring attention writes its own backward (reference_attention.py)."""
    p, rank = _group_size(group), dist.get_rank(group)
    x = x.contiguous()
    received = torch.empty_like(x)
    _note(counter, layer, direction, "send", x, group)
    send_to = dist.get_global_rank(group, (rank + 1) % p)
    recv_from = dist.get_global_rank(group, (rank - 1) % p)
    ops = [dist.P2POp(dist.isend, x, send_to, group), dist.P2POp(dist.irecv, received, recv_from, group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received
