"""Exponential moving average of the weights, kept sharded exactly like the parameters.

    ema = decay * ema + (1 - decay) * param        (after every applied optimizer step)

Each rank keeps the EMA of the parameter storage it holds: the full tensor under ZeRO 1/2 (parameters
are replicated), its own flat partition `param.ds_tensor` under ZeRO-3 (DeepSpeed's layout: the
flattened parameter, zero-padded to world_size equal parts, rank r holds part r). So the update needs
no communication and the EMA costs what the ZeRO-3 parameter shards cost, never a full model per rank.

The full EMA (checkpoints, validation sampling) is assembled by `full_state_dict()`, a collective:
under ZeRO-3 every rank's parts are all-gathered. `load_full_state_dict()` takes the full tensors and
keeps this rank's part, so a checkpoint loads with any data-parallel size. The EMA is fp32 whatever the
training precision; it follows the module's parameters (bf16 on GPUs), whose rounding averages out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_tensor")


def local_view(param: torch.Tensor) -> torch.Tensor:
    """The storage of `param` this rank owns: the flat ZeRO-3 partition, or the parameter itself."""
    return param.ds_tensor if _is_partitioned(param) else param.data


class ShardedEMA:
    """EMA of a (possibly ZeRO-3 partitioned) module's parameters, by parameter name."""

    def __init__(self, module: nn.Module, decay: float, *, group=None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in [0, 1)")
        self.decay = float(decay)
        self.group = group  # the group the ZeRO-3 partitions are spread over (DeepSpeed's: the world)
        self.params = dict(module.named_parameters())
        self.shadow = {name: local_view(p).detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Move the EMA towards the current weights (call after an applied optimizer step)."""
        for name, p in self.params.items():
            self.shadow[name].lerp_(local_view(p).float(), 1.0 - self.decay)

    def _group(self, param: torch.Tensor):
        # DeepSpeed records the group each parameter is partitioned over; the world by default.
        return getattr(param, "ds_process_group", None) or self.group

    def _world(self, group) -> tuple[int, int]:
        if not (dist.is_available() and dist.is_initialized()):
            return 1, 0
        return dist.get_world_size(group), dist.get_rank(group)

    @torch.no_grad()
    def full_state_dict(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Full fp32 EMA tensors by name, on `device`. Collective under ZeRO-3: call on every rank."""
        out = {}
        for name, p in self.params.items():
            shard = self.shadow[name]
            if _is_partitioned(p):
                group = self._group(p)
                parts = [torch.empty_like(shard) for _ in range(self._world(group)[0])]
                dist.all_gather(parts, shard.contiguous(), group=group)
                full = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
            else:
                full = shard
            out[name] = full.to(device).clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set the EMA from full tensors (as `full_state_dict` returns), keeping this rank's part."""
        missing = sorted(set(self.params) - set(state))
        unexpected = sorted(set(state) - set(self.params))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, p in self.params.items():
            full = state[name].float()
            shape = tuple(p.ds_shape) if _is_partitioned(p) else tuple(p.shape)
            if tuple(full.shape) != shape:
                raise ValueError(f"EMA tensor {name} has shape {tuple(full.shape)}, the model's is {shape}")
            shard = self.shadow[name]
            if _is_partitioned(p):
                world, rank = self._world(self._group(p))
                size = shard.numel()
                flat = torch.zeros(size * world, dtype=torch.float32)
                flat[: full.numel()] = full.reshape(-1)
                shard.copy_(flat[rank * size:(rank + 1) * size])
            else:
                shard.copy_(full.to(shard.device))
