"""Process setup for training: DeepSpeed's accelerator and process group, the device, small collectives.

Under the `deepspeed` launcher every process gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT. A process started without it (`pomvid train` on one device, tests) gets a world of one
on 127.0.0.1 and a free port. Without a GPU DeepSpeed uses its CPU accelerator and gloo: we set
DS_ACCELERATOR=cpu before DeepSpeed is imported so it does not guess.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, kw_only=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def skip_cpu_shm_op() -> None:
    """Do not JIT-compile DeepSpeed's CPU shared-memory all-reduce at init.

    DeepSpeed's CPU backend builds it in every process start unless a matching build is cached; only
    its inference all-reduce uses it (training collectives go through gloo). The build takes minutes on
    a busy machine and is redone whenever another Python environment has used the shared
    ~/.cache/torch_extensions in between (its flags differ), so CPU runs skip it.
    """
    import importlib

    # By name: the attribute `deepspeed.comm.torch` is shadowed by the torch package itself.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None


def init_distributed() -> DistInfo:
    """Initialise DeepSpeed's process group (idempotent) and pick this process's device."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # a single process, not started by a launcher
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cpu":
        skip_cpu_shm_op()
    # Idempotent, and wraps a process group someone else made (e.g. Ray Train's workers).
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def close_distributed() -> None:
    """Destroy the process group, if any. A gloo group still alive at interpreter exit can abort the
    process after its work is done ("terminate called without an active exception", exit -6), which a
    launcher reports as a failed run."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of `value` over all ranks (a new tensor; `value` is left alone)."""
    total = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def broadcast_tensors(tensors: list[torch.Tensor] | None, *, device: torch.device, src: int = 0) -> list[torch.Tensor]:
    """Rank `src`'s float32 tensors on every rank (shapes travel first). Others pass None."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(tensors or [])
    count = torch.tensor([len(tensors) if tensors is not None else 0], device=device)
    dist.broadcast(count, src)
    out = []
    for i in range(int(count.item())):
        ndim = torch.tensor([tensors[i].dim() if tensors is not None else 0], device=device)
        dist.broadcast(ndim, src)
        shape = torch.tensor(list(tensors[i].shape) if tensors is not None else [0] * int(ndim.item()),
                             dtype=torch.long, device=device)
        dist.broadcast(shape, src)
        value = (tensors[i].to(device=device, dtype=torch.float32).contiguous() if tensors is not None
                 else torch.empty(tuple(shape.tolist()), dtype=torch.float32, device=device))
        dist.broadcast(value, src)
        out.append(value)
    return out
