"""Spawned gloo process groups for the distributed tests, and the tiny PoM DiT they compare.

`run_distributed(worker, world_size, *args)` starts `world_size` CPU processes with
torch.multiprocessing spawn, initialises a gloo group on 127.0.0.1 and a free port, calls
`worker(rank, world_size, *args)` on each and returns every rank's result (a JSON-able value, written
to a temporary file: no pickles at rest). Spawning costs seconds, so a worker runs a whole
parametrisation set at once and the tests look up their case in the result.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.models.configs import DiTConfig
from pipeline.models.dit import PoMDiT

TEXT_DIM, TEXT_LEN, CHANNELS, SIDE = 16, 5, 4, 4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker: Callable, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    if os.path.exists("/sys/class/net/lo"):  # keep gloo on the loopback interface (Linux)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # P processes share 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_distributed(worker: Callable, world_size: int, *args) -> list:
    """Run `worker(rank, world_size, *args)` on `world_size` gloo processes; results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(worker, world_size, free_port(), out_dir, args), nprocs=world_size, join=True)
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]


# -- the tiny model and inputs ------------------------------------------------------------------------------


def tiny_dit(*, causal: bool, seed: int, variant: str = "v1", patch_t: int = 1, **options) -> PoMDiT:
    """Width 32, depth 2; every parameter random (the DiT's zero-initialised AdaLN and output layers
    would make most gradients zero and the comparison empty). options: other DiTConfig fields."""
    config = DiTConfig(in_channels=CHANNELS, patch_t=patch_t, patch_size=2, width=32, depth=2,
                       text_dim=TEXT_DIM, causal=causal, variant=variant, freq_dim=16, **options)
    torch.manual_seed(seed)
    model = PoMDiT(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return model


def tiny_inputs(*, batch: int, frames: int, seed: int, causal: bool, patch_t: int = 1,
                mask_last_frame: bool = False, side: int = SIDE) -> dict[str, torch.Tensor]:
    """Latents, timesteps (per token-frame when causal), text with a text mask, a target, and a
    caller frame mask that drops sample 1's last token-frame when `mask_last_frame`."""
    g = torch.Generator().manual_seed(seed)
    token_frames = frames // patch_t
    text_mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    for b in range(batch):
        text_mask[b, TEXT_LEN - 1 - b % (TEXT_LEN - 1):] = False  # 1 .. TEXT_LEN-1 valid tokens
    frame_mask = None
    if mask_last_frame and batch > 1:
        frame_mask = torch.ones(batch, token_frames, dtype=torch.bool)
        frame_mask[1, -1] = False
    shape = (batch, token_frames) if causal else (batch,)
    return {
        "latents": torch.randn(batch, CHANNELS, frames, side, side, generator=g),
        "timesteps": torch.rand(shape, generator=g),
        "text": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
        "text_mask": text_mask,
        "target": torch.randn(batch, CHANNELS, frames, side, side, generator=g),
        "frame_mask": frame_mask,
    }


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (0 when both are exactly zero)."""
    diff = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
