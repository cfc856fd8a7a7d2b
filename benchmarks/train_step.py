"""A full training step of the PoM DiT through DeepSpeed, next to an attention DiT of the same size.

Each row is one optimizer step (forward + flow-matching loss + backward + AdamW) of batch 1 through a
DeepSpeed ZeRO-2 engine on one device, built like the trainer builds it (pipeline/train/
deepspeed_config.py). The attention DiT is the same model with every PoM (self and cross) replaced by
multi-head attention through scaled_dot_product_attention (heads of 64 channels), so the two columns
differ only in the mixer.

On a GPU: bf16, sizes S and XL, about 16k and 32k video tokens per sample (latents 16 x T x 64 x 64,
patch 2: 1024 tokens per latent frame), 226 text tokens of width 4096 (T5-XXL), `--compile` to run
the model under torch.compile. MFU = the step's matmul FLOPs (pipeline/models/configs.py
`training_flops`, 3x forward; for attention plus its 4 N^2 D score/value FLOPs per forward) / step
time / the bf16 matmul peak measured in the same run. Times: median of the timed steps after warmup.
Without a GPU: fp32, a tiny model (width 128, depth 2), 1024 and 4096 tokens, one thread timed in its
CPU time (other processes on the machine do not inflate it); the CPU peak is an fp32 matmul.

    python benchmarks/train_step.py                          # GPU if there is one, else the CPU table
    python benchmarks/train_step.py --sizes XL --tokens 32768 --compile
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention with PoM's call signature: self-attention when context is None."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, context=None, context_mask=None, frame_tokens=None):
        if frame_tokens is not None:
            raise NotImplementedError("the reference attention DiT is bidirectional only")
        b, n, d = x.shape
        ctx = x if context is None else context
        q = self.q(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, h, N, d/h)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if context_mask is None else context_mask[:, None, None, :].bool()  # (B, 1, 1, M)
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, d))


def attention_dit(config):
    from pipeline.models.dit import PoMDiT

    model = PoMDiT(config)
    heads = max(1, config.width // 64)
    for block in model.blocks:
        block.self_pom, block.cross_pom = Attention(config.width, heads), Attention(config.width, heads)
    return model


def step_flops(config, kind: str, *, frames: int, height: int, width: int, text_len: int) -> int:
    """Matmul FLOPs of one training step of batch 1 (forward + backward = 3x forward)."""
    from pipeline.models.configs import _pom_flops, training_flops

    total = training_flops(config, batch=1, frames=frames, height=height, width=width, text_len=text_len)
    if kind == "pom":
        return total
    n = (frames // config.patch_t) * (height // config.patch_size) * (width // config.patch_size)
    d, m = config.width, text_len
    pom = _pom_flops(config, n, m) + _pom_flops(config, n, n)
    attention = (2 * n * d * d + 2 * m * d * 2 * d + 2 * n * d * d + 4 * n * m * d  # cross: q, kv, out, QK/AV
                 + 2 * n * d * 3 * d + 2 * n * d * d + 4 * n * n * d)  # self: qkv, out, QK/AV
    return total + 3 * config.depth * (attention - pom)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    seconds = []
    for _ in range(5):
        start = _clock(device)
        a @ b
        seconds.append(_clock(device) - start)
    return 2 * size**3 / statistics.median(seconds)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.thread_time()


def bench(kind: str, size: str, tokens: int, args, device: torch.device) -> dict:
    import deepspeed

    from pipeline.config import get_recipe
    from pipeline.config_overrides import apply_overrides
    from pipeline.models.dit import PoMDiT
    from pipeline.models.flow import flow_matching_loss
    from pipeline.train.deepspeed_config import build_deepspeed_config

    gpu = device.type == "cuda"
    config = apply_overrides(get_recipe("S" if size in ("tiny", "S") else size), [
        "data.micro_batch_size=1", "data.global_batch_size=1", "engine.zero_stage=2",
        f"engine.precision={'bf16' if gpu else 'fp32'}", "engine.activation_checkpointing=false"])
    model_config = config.model
    if size == "tiny":
        model_config = replace(model_config, width=128, depth=2, text_dim=64, freq_dim=64)
    side = 64 if gpu else 16  # latent height = width
    per_frame = (side // model_config.patch_size) ** 2
    frames = max(1, tokens // per_frame)
    torch.manual_seed(0)
    model = PoMDiT(model_config) if kind == "pom" else attention_dit(model_config)
    ds = build_deepspeed_config(config, config.layout(1), device_type=device.type)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    if args.compile:
        engine.compile()
    dtype = next(engine.module.parameters()).dtype
    latents = torch.randn(1, model_config.in_channels, frames, side, side, device=device, dtype=dtype)
    target = torch.randn_like(latents, dtype=torch.float32)
    text = torch.randn(1, args.text_len, model_config.text_dim, device=device, dtype=dtype)
    mask = torch.ones(1, args.text_len, dtype=torch.bool, device=device)
    t = torch.rand(1, device=device)
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        start = _clock(device)
        loss = flow_matching_loss(engine(latents, t, text, mask), target)
        engine.backward(loss)
        engine.step()
        elapsed = _clock(device) - start
        if i >= args.warmup:
            times.append(elapsed)
    seconds = statistics.median(times)
    flops = step_flops(model_config, kind, frames=frames, height=side, width=side, text_len=args.text_len)
    row = {"model": kind, "size": size, "tokens": frames * per_frame, "ms": seconds * 1e3,
           "tokens_s": frames * per_frame / seconds, "tflops": flops / seconds / 1e12,
           "gib": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None}
    del engine, model
    if gpu:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--sizes", nargs="+", default=None, help="model sizes (default: S XL on GPU, tiny on CPU)")
    parser.add_argument("--tokens", nargs="+", type=int, default=None,
                        help="video tokens per sample (default: 16384 32768 on GPU, 1024 4096 on CPU)")
    parser.add_argument("--models", nargs="+", default=["pom", "attention"], choices=("pom", "attention"))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 GPU, 1 CPU)")
    parser.add_argument("--text-len", type=int, default=None, help="text tokens (default: 226 GPU, 16 CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda"
                          else "cpu")
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(1)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args.sizes = args.sizes or (["S", "XL"] if gpu else ["tiny"])
    args.tokens = args.tokens or ([16384, 32768] if gpu else [1024, 4096])
    args.steps = args.steps or (10 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.text_len = args.text_len or (226 if gpu else 16)

    import logging

    from pipeline.train.distributed import init_distributed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_distributed()  # a world of one process
    dtype = torch.bfloat16 if gpu else torch.float32
    peak = matmul_peak(device, dtype, 8192 if gpu else 1024)
    name = torch.cuda.get_device_name(device) if gpu else f"{platform.machine()} CPU, 1 thread, thread CPU time"
    print(f"# {name}; torch {torch.__version__}; {str(dtype).replace('torch.', '')}; DeepSpeed ZeRO-2, one device; "
          f"batch 1; text {args.text_len} tokens; compile {args.compile}; median of {args.steps} steps")
    print(f"# measured matmul peak: {peak / 1e12:.4g} TFLOP/s")
    print("\n| model | size | tokens | step ms | tokens/s | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        for tokens in args.tokens:
            for kind in args.models:
                r = bench(kind, size, tokens, args, device)
                gib = "-" if r["gib"] is None else f"{r['gib']:.1f}"
                print(f"| {'PoM' if kind == 'pom' else 'attention'} | {size} | {r['tokens']} | {r['ms']:.1f} | "
                      f"{r['tokens_s']:.0f} | {r['tflops']:.3g} | {r['tflops'] * 1e12 / peak:.1%} | {gib} |", flush=True)


if __name__ == "__main__":
    main()
