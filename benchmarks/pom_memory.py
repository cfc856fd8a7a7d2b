"""Bytes a PoM layer and a PoM DiT block keep for backward, against SDPA attention; and what the
recomputing backward costs in time.

Memory: every tensor autograd saves during one forward is seen by `torch.autograd.graph.saved_tensors_hooks`;
we count each distinct storage once (views of one tensor are not double-counted) and leave out the
parameters' storages (they are kept anyway, whatever the mixer). The count depends on shapes and
dtypes only, not on the hardware: it is the activation-memory target, measured on a CPU. fp32, batch 1.

- layer: a self-mixing PoM (degree 2, expand 2) of width D, bidirectional, masked (last frame of 256
  tokens padded) and block-causal (frames of 256 tokens), v1 and v2, with the recomputing backward
  (the default) and with plain autograd (`recompute=False`, the old implementation);
- attention: qkv projection, `scaled_dot_product_attention` with 64-channel heads, output projection;
- block: a PoM DiT block (AdaLN, cross-PoM over 77 text tokens, self-PoM, 4x FFN) against the same
  block with both PoMs replaced by attention (self- and cross-attention).

Time: forward + backward of the layer (and block) with the recomputing backward and with plain
autograd, side by side in the same run (median of --repeats), as a ratio.

    python benchmarks/pom_memory.py                                   # 4k and 16k tokens, width 384 and 1152
    python benchmarks/pom_memory.py --widths 384 --tokens 4096        # quick
    python benchmarks/pom_memory.py --device cuda --peak              # + torch.cuda.max_memory_allocated
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.configs import DiTConfig
from pipeline.models.dit import PoMBlock
from pipeline.models.pom import PoM

FRAME_TOKENS, TEXT_TOKENS, HEAD_DIM = 256, 77, 64
MODES = ("bidirectional", "masked", "block-causal")


class Attention(nn.Module):
    """Multi-head attention with SDPA, called like a PoM (masks and frames ignored: bidirectional)."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, context=None, context_mask=None, frame_tokens=None):
        b, n, d = x.shape
        ctx = x if context is None else context
        q = self.q(x).view(b, n, self.heads, HEAD_DIM).transpose(1, 2)  # (B, H, N, 64)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, 64)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


def saved_bytes(run: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps while `run()` builds its graph."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values())


def _inputs(width: int, tokens: int, mode: str, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, tokens, width, device=device, generator=g, requires_grad=True)
    mask = None
    if mode == "masked":
        mask = torch.ones(1, tokens, dtype=torch.bool, device=device)
        mask[:, -FRAME_TOKENS:] = False  # a padded last frame
    return {"x": x, "mask": mask, "frame_tokens": FRAME_TOKENS if mode == "block-causal" else None,
            "cond": torch.randn(1, 1, width, device=device, generator=g),
            "text": torch.randn(1, TEXT_TOKENS, width, device=device, generator=g)}


def build(kind: str, width: int, device) -> tuple[nn.Module, Callable]:
    """(module, call(inputs) -> output) for kind in attention, v1, v2, block-attention, block-v1, block-v2."""
    torch.manual_seed(0)
    if kind == "attention":
        module = Attention(width)
        return module.to(device), lambda i: module(i["x"])
    if kind in ("v1", "v2"):
        module = PoM(width, 2, 2, kind)
        return module.to(device), lambda i: module(i["x"], context_mask=i["mask"], frame_tokens=i["frame_tokens"])
    variant = "v1" if kind == "block-attention" else kind.split("-")[1]
    block = PoMBlock(DiTConfig(width=width, variant=variant))
    if kind == "block-attention":
        block.self_pom, block.cross_pom = Attention(width), Attention(width)
    block = block.to(device)
    return block, lambda i: block(i["x"], i["cond"], i["text"], None, i["mask"], i["frame_tokens"])


def _set_recompute(module: nn.Module, recompute: bool) -> None:
    for m in module.modules():
        if isinstance(m, PoM):
            m.recompute = recompute


def fwd_bwd_seconds(module, call, inputs, repeats: int, device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        module.zero_grad(set_to_none=True)
        inputs["x"].grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call(inputs).square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def peak_bytes(module, call, inputs, device) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call(inputs).square().mean().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def measure(width: int, tokens: int, args, device) -> list[dict]:
    rows = []
    for scope in ("layer", "block"):
        for mixer in ("attention", "v1", "v2"):
            kind = mixer if scope == "layer" else f"block-{mixer}"
            module, call = build(kind, width, device)
            params = list(module.parameters())
            for mode in (("bidirectional",) if mixer == "attention" else MODES):
                for recompute in ((True,) if mixer == "attention" else (True, False)):
                    _set_recompute(module, recompute)
                    inputs = _inputs(width, tokens, mode, device)
                    row = {"width": width, "tokens": tokens, "scope": scope, "mixer": mixer, "mode": mode,
                           "recompute": recompute,
                           "bytes": saved_bytes(lambda c=call, i=inputs: c(i), params)}
                    timed = tokens <= args.time_max_tokens and mixer != "attention"
                    row["seconds"] = fwd_bwd_seconds(module, call, inputs, args.repeats, device) if timed else None
                    row["peak"] = peak_bytes(module, call, inputs, device) if args.peak else None
                    rows.append(row)
                    print(f"  measured {scope} {mixer} {mode} recompute={recompute}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| width | tokens | scope | mixer | mode | backward | bytes/token | x input | / attention "
             "| fwd+bwd s | recompute time / autograd |" + (" peak MiB |" if rows[0]["peak"] is not None else ""),
             "|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if rows[0]["peak"] is not None else "")]
    for r in rows:
        attn = next(a for a in rows if a["mixer"] == "attention" and a["scope"] == r["scope"]
                    and a["width"] == r["width"] and a["tokens"] == r["tokens"])
        twin = next((a for a in rows if a["mixer"] == r["mixer"] and a["scope"] == r["scope"] and a["mode"] == r["mode"]
                     and a["width"] == r["width"] and a["tokens"] == r["tokens"] and not a["recompute"]), None)
        ratio = "-"
        if r["recompute"] and twin is not None and r["seconds"] and twin["seconds"]:
            ratio = f"{r['seconds'] / twin['seconds']:.2f}"
        backward = "-" if r["mixer"] == "attention" else ("recompute" if r["recompute"] else "autograd")
        per_token, input_bytes = r["bytes"] / r["tokens"], r["width"] * 4
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.3f}"
        peak = "" if r["peak"] is None else f" {r['peak'] / 2**20:,.1f} |"
        lines.append(f"| {r['width']} | {r['tokens']:,} | {r['scope']} | {r['mixer']} | {r['mode']} | {backward} | "
                     f"{per_token:,.0f} | {per_token / input_bytes:.2f} | {r['bytes'] / attn['bytes']:.2f} | "
                     f"{secs} | {ratio} |{peak}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[384, 1152])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd runs per row (median)")
    parser.add_argument("--time-max-tokens", type=int, default=4096,
                        help="time fwd+bwd only up to this many tokens (slow on a CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak", action="store_true", help="also torch.cuda.max_memory_allocated (cuda only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.peak and device.type != "cuda":
        parser.error("--peak needs --device cuda")
    bad = [n for n in args.tokens if n % FRAME_TOKENS or n <= FRAME_TOKENS]
    if bad or any(w % HEAD_DIM for w in args.widths):
        parser.error(f"--tokens must be multiples of {FRAME_TOKENS} (> one frame), --widths of {HEAD_DIM}")
    start = time.time()
    rows = [row for w in args.widths for n in args.tokens for row in measure(w, n, args, device)]
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\n# Bytes kept for backward ({hardware}, torch {torch.__version__}, fp32, batch 1; "
          f"{time.time() - start:.0f} s)\n")
    print(table(rows))
    worst = {}
    for scope in ("layer", "block"):
        ratios = [r["bytes"] / next(a["bytes"] for a in rows if a["mixer"] == "attention" and a["scope"] == scope
                                    and a["width"] == r["width"] and a["tokens"] == r["tokens"])
                  for r in rows if r["scope"] == scope and r["mixer"] != "attention" and r["recompute"]]
        worst[scope] = max(ratios)
        print(f"\nworst PoM {scope} / attention (recomputing backward): {worst[scope]:.2f} (bar <= 1.0, aim <= 0.5)")
    return 0 if max(worst.values()) <= 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
