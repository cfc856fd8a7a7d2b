"""Exponential moving average of the fp32 master weights, kept on each rank's own partition.

    ema = decay * ema + (1 - decay) * master        (after every applied optimizer step)

`master` is DeepSpeed's fp32 copy of the weights that the optimizer updates (bf16 runs train bf16
module weights: averaging those would average their rounding). Each rank averages only the fp32
elements it owns, so the EMA costs 4 bytes per parameter / world size per rank and the update needs
no communication:
- ZeRO-3: the local fp32 partition of each parameter (`deepspeed.utils.safe_get_local_fp32_param`;
  rank r owns the elements [r * size, (r + 1) * size) of the flattened, zero-padded parameter);
- ZeRO-1/2: the fragment of each parameter inside this rank's fp32 partition (the `_hp_mapping`
  DeepSpeed attaches to every parameter and that its `safe_get_full_fp32_param` reads; None when this
  rank owns nothing of that parameter);
- no DeepSpeed (unit tests, single-device tools): the parameter itself.
The update is one `torch._foreach_lerp_` over all owned fragments.

Only rank 0 materialises the full EMA (checkpoints, validation): `full_state_dict()` is a collective
that, one parameter at a time, reduces each rank's fragment (zeros elsewhere) to rank 0; other ranks
allocate one parameter's buffer at a time and get None. At start, one all-reduce checks that every
element of every parameter is owned by exactly one rank. `load_full_state_dict()` takes full tensors
and keeps this rank's fragments, so a checkpoint loads with any data-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(kw_only=True)
class _Owned:
    """The fp32 elements of one parameter that this rank owns."""

    start: int
    """Offset of the first owned element in the flattened parameter."""

    numel: int
    """Owned elements (0: none)."""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _owned(param: torch.Tensor) -> _Owned:
    if hasattr(param, "ds_id"):  # ZeRO-3
        size = param.partition_numel()
        rank = dist.get_rank(param.ds_process_group)
        return _Owned(start=rank * size, numel=max(0, min(size, param.ds_numel - rank * size)))
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2
        mapping = param._hp_mapping
        if mapping is None:
            return _Owned(start=0, numel=0)
        return _Owned(start=mapping.lp_fragment_address.start, numel=mapping.lp_fragment_address.numel)
    return _Owned(start=0, numel=param.numel())


def _master(param: torch.Tensor, owned: _Owned) -> torch.Tensor:
    """This rank's fp32 master elements of `param` (flat, `owned.numel` long)."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(param).reshape(-1)[: owned.numel]
    if hasattr(param, "_hp_mapping"):
        return param._hp_mapping.get_hp_fragment().reshape(-1)
    return param.detach().reshape(-1).float()


def _full_numel(param: torch.Tensor) -> int:
    return int(param.ds_numel) if hasattr(param, "ds_id") else param.numel()


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(param.ds_shape) if hasattr(param, "ds_id") else tuple(param.shape)


class ShardedEMA:
    """EMA of the fp32 master weights of a (DeepSpeed-wrapped) module, by parameter name."""

    def __init__(self, module: nn.Module, decay: float, *, device: str | torch.device = "cpu"):
        """`device`: where the collectives of `full_state_dict` run (the process group's device)."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in [0, 1)")
        self.decay = float(decay)
        self.device = torch.device(device)
        self.params = dict(module.named_parameters())
        self.owned = {name: _owned(p) for name, p in self.params.items()}
        self.shadow = {name: _master(p, self.owned[name]).detach().clone().float()
                       for name, p in self.params.items() if self.owned[name].numel}
        self._check_coverage()

    def _check_coverage(self) -> None:
        """Every element of every parameter owned by exactly one rank (one all-reduce)."""
        counts = torch.tensor([self.owned[n].numel for n in self.params], dtype=torch.float64, device=self.device)
        if _world()[0] > 1:
            dist.all_reduce(counts)
        wrong = [(n, int(c)) for n, c in zip(self.params, counts.tolist()) if int(c) != _full_numel(self.params[n])]
        if wrong:
            raise RuntimeError(f"EMA: the ranks' fp32 partitions do not cover the parameters exactly once "
                               f"(name, owned elements): {wrong[:5]}; an unsupported DeepSpeed layout?")

    def local_numel(self) -> int:
        """fp32 elements this rank keeps (its partition)."""
        return sum(t.numel() for t in self.shadow.values())

    @torch.no_grad()
    def update(self) -> None:
        """Move the EMA towards the current fp32 masters (call after an applied optimizer step)."""
        names = list(self.shadow)
        if names:
            masters = [_master(self.params[n], self.owned[n]) for n in names]
            torch._foreach_lerp_([self.shadow[n] for n in names], masters, 1.0 - self.decay)

    @torch.no_grad()
    def full_state_dict(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
        """Full fp32 EMA tensors by name on `device` on rank 0; None on the other ranks. A collective:
        call on every rank."""
        world, rank = _world()
        out = {} if rank == 0 else None
        for name, p in self.params.items():
            owned, shadow = self.owned[name], self.shadow.get(name)
            if world == 1:
                full = shadow
            else:
                full = torch.zeros(_full_numel(p), dtype=torch.float32, device=self.device)
                if shadow is not None:
                    full[owned.start:owned.start + owned.numel] = shadow
                dist.reduce(full, dst=0, op=dist.ReduceOp.SUM)  # each element has one owner: exact
            if out is not None:
                out[name] = full.reshape(_full_shape(p)).to(device).clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set the EMA from full tensors (as `full_state_dict` returns), keeping this rank's fragments."""
        missing = sorted(set(self.params) - set(state))
        unexpected = sorted(set(state) - set(self.params))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, p in self.params.items():
            full = state[name].float()
            if tuple(full.shape) != _full_shape(p):
                raise ValueError(f"EMA tensor {name} has shape {tuple(full.shape)}, the model's is {_full_shape(p)}")
            if name in self.shadow:
                owned = self.owned[name]
                self.shadow[name].copy_(full.reshape(-1)[owned.start:owned.start + owned.numel])
