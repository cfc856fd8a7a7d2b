"""Throughput, memory and MFU of training steps.

MFU = model FLOPs of the step (pipeline/models/configs.py `training_flops`: every matmul, forward +
backward) / (step time x number of accelerators x peak FLOP/s of one). The peak is configured
(`train.peak_tflops`) or measured at start with a large bf16 matmul on the GPU; on a CPU there is no
MFU (the CPU path is for tests and debugging).
"""

from __future__ import annotations

import resource
import time

import torch

from pipeline.models.configs import DiTConfig, training_flops


def measure_matmul_peak(device: torch.device, *, size: int = 8192, iters: int = 20,
                        dtype: torch.dtype = torch.bfloat16) -> float:
    """Achieved FLOP/s of a square matmul on `device` (the MFU denominator when none is configured)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * iters / (time.perf_counter() - start)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on a CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StepMeter:
    """Accumulates steps between two log points and turns them into metrics."""

    def __init__(self, model: DiTConfig, *, world_size: int, device: torch.device, peak_flops: float | None):
        self.model, self.world_size, self.device, self.peak_flops = model, world_size, device, peak_flops
        self.reset()

    def reset(self) -> None:
        self.steps, self.seconds, self.samples, self.tokens, self.flops = 0, 0.0, 0, 0, 0.0
        self.losses: list[float] = []

    def add(self, *, seconds: float, samples: int, tokens: int, latent_shape: tuple[int, ...], text_len: int,
            loss: float | None) -> None:
        """One optimizer step over `samples` global samples of latents (C, T, H, W)."""
        _, frames, height, width = latent_shape
        self.steps += 1
        self.seconds += seconds
        self.samples += samples
        self.tokens += tokens
        self.flops += training_flops(self.model, batch=samples, frames=frames, height=height, width=width,
                                     text_len=text_len)
        if loss is not None:
            self.losses.append(loss)

    def metrics(self) -> dict[str, float]:
        if not self.steps:
            return {}
        out = {
            "perf/step_time_s": self.seconds / self.steps,
            "perf/samples_per_s": self.samples / self.seconds,
            "perf/tokens_per_s": self.tokens / self.seconds,
            "perf/tflops_per_device": self.flops / self.seconds / self.world_size / 1e12,
            "memory/peak_gb": peak_memory_gb(self.device),
        }
        if self.losses:
            out["train/loss_avg"] = sum(self.losses) / len(self.losses)
        if self.peak_flops:
            out["perf/mfu"] = self.flops / self.seconds / self.world_size / self.peak_flops
        return out
