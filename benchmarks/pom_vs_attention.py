"""PoM against multi-head attention: forward + backward time, peak memory and TFLOP/s.

Two comparisons at each sequence length, batch 1:
- mixer: PoM (degree 2, expand 2) vs attention (qkv projection, scaled_dot_product_attention, output);
- block: pre-norm mixer + pre-norm FFN (4x, gelu-tanh), each with its residual.

On a GPU: bf16, width 1152 (DiT-XL), 4k to 128k tokens, PoM under torch.compile, attention through
PyTorch's fused SDPA kernels (flash / cuDNN / memory-efficient, whichever PyTorch picks). Times are CUDA
events (on the CPU: one thread, timed by its CPU time, so other processes sharing the cores do not
inflate it), median over the timed iterations after warmup; memory is torch.cuda.max_memory_allocated
during one forward + backward (weights and input included). Without a GPU it runs small fp32 sizes on
the CPU (no peak memory: PyTorch does not track CPU allocations).

TFLOP/s use the matmul FLOPs of forward + backward (3x forward); the attention score and value
matmuls count 4 N^2 D forward. The matmul peak is a large matmul measured in the same run.

    python benchmarks/pom_vs_attention.py                      # GPU if there is one, else CPU
    python benchmarks/pom_vs_attention.py --device cpu --tokens 1024 2048 --width 384
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.pom import PoM


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"--width {dim} must be a multiple of --heads {heads}")
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d/h)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm residual mixer then pre-norm residual FFN (mlp ratio 4)."""

    def __init__(self, dim: int, mixer: nn.Module):
        super().__init__()
        self.norm1, self.norm2, self.mixer = nn.LayerNorm(dim), nn.LayerNorm(dim), mixer
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def forward_flops(kind: str, tokens: int, dim: int) -> int:
    """Matmul FLOPs of one forward at batch 1."""
    if kind.startswith("attention"):
        mixer = 2 * tokens * dim * 4 * dim + 4 * tokens * tokens * dim  # qkv + out; QK^T and AV
    else:
        mixer = 3 * 2 * tokens * dim * 4 * dim  # features, gate, output with state 4D
    return mixer + (16 * tokens * dim * dim if kind.endswith("block") else 0)


def build(kind: str, dim: int, heads: int, variant: str) -> nn.Module:
    mixer = Attention(dim, heads) if kind.startswith("attention") else PoM(dim, 2, 2, variant)
    return Block(dim, mixer) if kind.endswith("block") else mixer


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn, warmup: int, iters: int) -> float:
        """Median milliseconds of fn() over `iters` runs after `warmup` runs."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:  # one intra-op thread: its CPU time ignores other processes sharing the cores
                t0 = time.thread_time()
                fn()
                times.append(1000 * (time.thread_time() - t0))
        return statistics.median(times)


def matmul_peak(device, dtype, size: int, timer: Timer) -> float:
    """TFLOP/s of a square matmul of `size`: the ceiling the TFLOP/s columns compare to."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    ms = timer.measure(lambda: a @ b, warmup=3, iters=10)
    return 2 * size**3 / (ms / 1000) / 1e12


def run_case(kind, tokens, args, device, dtype, timer):
    """(median ms, peak GiB or None) of one forward + backward; None time on out-of-memory."""
    torch.manual_seed(0)
    if args.compile:
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit, no stale guards
    module = build(kind, args.width, args.heads, args.variant).to(device=device, dtype=dtype)
    if kind.startswith("pom") and args.compile:
        module = torch.compile(module)
    x = torch.randn(1, tokens, args.width, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        module(x).backward(grad)
        x.grad = None
        module.zero_grad(set_to_none=True)

    try:
        ms = timer.measure(step, args.warmup, args.iters)
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated() / 2**30
        return ms, peak
    except torch.OutOfMemoryError:
        return None, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--tokens", type=int, nargs="+", help="sequence lengths (default by device)")
    parser.add_argument("--width", type=int, help="model width (default 1152 on GPU, 384 on CPU)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads (DiT-XL: 16)")
    parser.add_argument("--variant", choices=["v1", "v2"], default="v1")
    parser.add_argument("--warmup", type=int, help="untimed runs (default 5 GPU, 1 CPU)")
    parser.add_argument("--iters", type=int, help="timed runs, the median is reported (default 20 GPU, 3 CPU)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="PoM in eager mode")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    args.tokens = args.tokens or ([4096, 16384, 32768, 65536, 131072] if cuda else [1024, 2048, 4096])
    args.width = args.width or (1152 if cuda else 384)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.iters = args.iters or (20 if cuda else 3)
    if not cuda:
        torch.set_num_threads(1)  # so that the thread's CPU time is the whole work (see Timer)
    args.compile = args.compile and cuda  # compiling on CPU needs a C++ toolchain and is not the claim
    timer = Timer(device)

    hardware = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, " \
        "1 thread, timed in thread CPU time"
    peak = matmul_peak(device, dtype, 8192 if cuda else 2048, timer)
    print(f"# {hardware}; torch {torch.__version__}; {str(dtype).removeprefix('torch.')}; width {args.width}; "
          f"heads {args.heads}; PoM {args.variant} degree 2 expand 2{' compiled' if args.compile else ''}; "
          f"batch 1; forward+backward; median of {args.iters}")
    load = "" if cuda else f"; load average {os.getloadavg()[0]:.1f} (other processes share the CPU)"
    print(f"# measured matmul peak: {peak:.3g} TFLOP/s{load}")
    print("| what | tokens | attention ms | PoM ms | speed-up | attention GiB | PoM GiB | memory ratio "
          "| attention TFLOP/s | PoM TFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for what in ("mixer", "block"):
        for tokens in args.tokens:
            attn_ms, attn_mem = run_case(f"attention_{what}", tokens, args, device, dtype, timer)
            pom_ms, pom_mem = run_case(f"pom_{what}", tokens, args, device, dtype, timer)
            if cuda:
                torch.cuda.empty_cache()  # the cases' tensors are gone; start the next one clean

            def tflops(kind, ms, tokens=tokens):
                return "OOM" if ms is None else f"{3 * forward_flops(kind, tokens, args.width) / (ms / 1000) / 1e12:.3g}"

            def fmt(value, spec):
                return "-" if value is None else format(value, spec)

            ratio = attn_ms / pom_ms if attn_ms and pom_ms else None
            mem_ratio = pom_mem / attn_mem if attn_mem and pom_mem else None
            print(f"| {what} | {tokens} | {fmt(attn_ms, '.1f')} | {fmt(pom_ms, '.1f')} | {fmt(ratio, '.1f')}x "
                  f"| {fmt(attn_mem, '.2f')} | {fmt(pom_mem, '.2f')} | {fmt(mem_ratio, '.2f')} "
                  f"| {tflops(f'attention_{what}', attn_ms)} | {tflops(f'pom_{what}', pom_ms)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
