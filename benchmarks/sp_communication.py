"""Bytes moved by sequence parallelism: PoM-SP against DeepSpeed-Ulysses and Ring attention.

Measured: for each SP degree P, P gloo processes run one layer's forward + backward on their 1/P of
N tokens, and the CommCounter (pipeline/parallel/collectives.py) records every collective:
- PoM-SP: a self-PoM layer with the SP reducer, bidirectional (all-reduce of (sum, count)) and
  block-causal (all-gather of rank totals, 256 tokens per frame); v1 (state k*e*D = 4D + 1 numbers)
  and v2, the authors' formulation (state e*D = 2D + 1: half the bytes at degree 2);
- Ulysses and Ring: the reference attention layers of pipeline/parallel/reference_attention.py, with
  the same width. Up to --exact-max-tokens they compute exact attention (CPU flash kernels); above,
  an O(N) stand-in for the local math keeps the run short on a CPU: same collectives and tensors,
  hence the same bytes (checked in tests/distributed/test_reference_attention.py).

Bytes are per rank, per layer, per training step (forward + backward), as the payload each rank
contributes (the formulas' unit; "wire" is the estimate with ring algorithms). Then the formulas,
checked against the measurements, are extrapolated to P up to 1024 and a 1M-token video at a DiT-XL
width. Prints both tables (markdown) and writes sp_communication.png and .json under --out.

    python benchmarks/sp_communication.py                         # width 64, ~1-2 min on 2 cores
    python benchmarks/sp_communication.py --tokens 4096 --sp 2    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.models.pom import PoM
from pipeline.parallel.collectives import CommCounter
from pipeline.parallel.reducers import SequenceParallelReducer
from pipeline.parallel.reference_attention import RingAttention, UlyssesAttention

METHODS = ("PoM-SP", "PoM-SP causal", "PoM-SP v2", "PoM-SP v2 causal", "Ulysses", "Ring")
POM_METHODS = METHODS[:4]
FRAME_TOKENS = 256  # tokens per latent frame for block-causal PoM (a 32x32 latent with 2x2 patches)
ELEMENT = 4  # float32


# -- formulas (bytes per rank per layer per training step) ------------------------------------------------


def formula(method: str, *, tokens: int, sp: int, width: int, batch: int = 1, degree: int = 2,
            expand: int = 2, element: int = ELEMENT, wire: bool = False) -> float:
    # sum and count; v1's state is k*e*D wide, v2's e*D (powers summed with learned coefficients)
    state = (expand * width if "v2" in method else degree * expand * width) + 1
    n_local = tokens / sp
    if method in ("PoM-SP", "PoM-SP v2"):  # one all-reduce of B * (S + 1) forward, one backward
        payload, factor = 2 * batch * state, 2 * (sp - 1) / sp
    elif method in ("PoM-SP causal", "PoM-SP v2 causal"):  # one all-gather of B * (S + 1) forward, one backward
        payload, factor = 2 * batch * state, sp - 1
    elif method == "Ulysses":  # all-to-all of Q, K, V, O forward and their gradients backward
        payload, factor = 8 * batch * n_local * width, (sp - 1) / sp
    elif method == "Ring":  # K, V: P - 1 hops forward; K, V and dK, dV: P - 1 hops each backward
        payload, factor = 6 * batch * n_local * width * (sp - 1), 1.0
    else:
        raise ValueError(f"unknown method {method!r}")
    return payload * element * (factor if wire else 1.0)


# -- measurement ----------------------------------------------------------------------------------------------


def _layer(method: str, width: int, heads: int, group, counter: CommCounter, exact: bool):
    if method.startswith("PoM-SP"):
        pom = PoM(width, variant="v2" if "v2" in method else "v1")
        pom.reducer = SequenceParallelReducer(group, counter=counter, layer=method)
        causal = method.endswith("causal")
        return lambda x: pom(x, frame_tokens=FRAME_TOKENS if causal else None)
    cls = UlyssesAttention if method == "Ulysses" else RingAttention
    return cls(width, heads, group, counter=counter, layer=method, exact=exact)


def _worker(rank: int, world: int, port: int, out_dir: str, args: dict) -> None:
    if os.path.exists("/sys/class/net/lo"):  # keep gloo on the loopback interface (Linux)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    try:
        for tokens in args["tokens"]:
            for method in METHODS:
                exact = tokens <= args["exact_max_tokens"]
                torch.manual_seed(0)
                counter = CommCounter()
                layer = _layer(method, args["width"], args["heads"], dist.group.WORLD, counter, exact)
                x = torch.randn(args["batch"], tokens // world, args["width"], requires_grad=True)
                layer(x).square().mean().backward()
                rows.append({"method": method, "tokens": tokens, "sp": world, "bytes": counter.bytes(),
                             "wire": counter.bytes(wire=True), "calls": counter.calls(),
                             "attention": "-" if method.startswith("PoM") else ("exact" if exact else "stand-in")})
        if rank == 0:
            Path(out_dir, "rows.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def measure(sp: int, args: dict) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(sp, port, out_dir, args), nprocs=sp, join=True)
        return json.loads(Path(out_dir, "rows.json").read_text())


# -- tables and plot ------------------------------------------------------------------------------------------


def _mb(x: float) -> str:
    return f"{x / 2**20:,.3f}" if x < 2**20 else f"{x / 2**20:,.1f}"


def measured_table(rows: list[dict], width: int, batch: int) -> str:
    lines = ["| N tokens | P | local attention | " + " | ".join(METHODS) + " | PoM-SP / Ulysses "
             "| PoM-SP / Ring | all = formula |",
             "|---:|---:|---|" + "---:|" * len(METHODS) + "---:|---:|---|"]
    cells = {(r["tokens"], r["sp"], r["method"]): r for r in rows}
    for tokens, sp in sorted({(r["tokens"], r["sp"]) for r in rows}, key=lambda k: (k[1], k[0])):
        b = {m: cells[(tokens, sp, m)]["bytes"] for m in METHODS}
        exact = all(b[m] == formula(m, tokens=tokens, sp=sp, width=width, batch=batch) for m in METHODS)
        lines.append(f"| {tokens:,} | {sp} | {cells[(tokens, sp, 'Ulysses')]['attention']} | "
                     + " | ".join(f"{b[m]:,}" for m in METHODS)
                     + f" | {b['PoM-SP'] / b['Ulysses']:.1e} | {b['PoM-SP'] / b['Ring']:.1e} | "
                     f"{'yes' if exact else 'NO'} |")
    return "\n".join(lines)


def extrapolated_table(tokens: int, width: int, heads: int, sps: list[int]) -> str:
    lines = ["| P | " + " | ".join(METHODS) + " | PoM-SP causal, wire est. | Ulysses / PoM-SP |",
             "|---:|" + "---:|" * (len(METHODS) + 2)]
    for sp in sps:
        v = {m: formula(m, tokens=tokens, sp=sp, width=width) for m in METHODS}
        causal_wire = formula("PoM-SP causal", tokens=tokens, sp=sp, width=width, wire=True)
        uly = _mb(v["Ulysses"]) + ("" if sp <= heads else " (P > heads)")
        lines.append(f"| {sp} | " + " | ".join(_mb(v[m]) for m in POM_METHODS) + f" | {uly} | {_mb(v['Ring'])} | "
                     f"{_mb(causal_wire)} | {v['Ulysses'] / v['PoM-SP']:,.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, *, width: int, big_tokens: int, big_width: int, heads: int,
         sps: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip(METHODS, ("tab:green", "tab:olive", "tab:cyan", "tab:purple", "tab:red", "tab:blue")))
    for sp, style in zip(sorted({r["sp"] for r in rows}), ("--", "-")):
        for m in METHODS:
            pts = sorted((r["tokens"], r["bytes"]) for r in rows if r["method"] == m and r["sp"] == sp)
            left.plot(*zip(*pts), style, marker="o", color=colours[m], label=f"{m}, P={sp}")
    left.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="bytes per rank per layer per step",
             title=f"Measured over gloo (width {width}, batch 1, fp32)")
    left.legend(fontsize=7)
    for m in METHODS:
        right.plot(sps, [formula(m, tokens=big_tokens, sp=p, width=big_width) for p in sps], marker=".",
                   color=colours[m], label=m)
    right.plot(sps, [formula("PoM-SP causal", tokens=big_tokens, sp=p, width=big_width, wire=True) for p in sps],
               ls="--", color=colours["PoM-SP causal"], label="PoM-SP causal, wire estimate (all-gather)")
    right.axvline(heads, color="grey", ls=":", label=f"Ulysses limit P = heads ({heads})")
    right.set(xscale="log", yscale="log", xlabel="SP degree P", ylabel="bytes per rank per layer per step",
              title=f"Formulas: {big_tokens / 2**20:.0f}M tokens, width {big_width}, fp32")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--sp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--width", type=int, default=64, help="layer width D of the measured layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (Ulysses needs P | heads)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--exact-max-tokens", type=int, default=16384,
                        help="exact local attention up to this N, the O(N) stand-in above (same bytes)")
    parser.add_argument("--big-tokens", type=int, default=2**20, help="video length for the extrapolation")
    parser.add_argument("--big-width", type=int, default=1152, help="width for the extrapolation (DiT-XL)")
    parser.add_argument("--big-heads", type=int, default=16, help="heads at that width (DiT-XL: 16)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    args = parser.parse_args(argv)
    for sp in args.sp:
        bad = [n for n in args.tokens if n % (sp * FRAME_TOKENS)]
        if bad or args.heads % sp:
            parser.error(f"--tokens must be multiples of P * {FRAME_TOKENS} and --heads of P={sp}")

    start = time.time()
    settings = {"tokens": args.tokens, "width": args.width, "heads": args.heads, "batch": args.batch,
                "exact_max_tokens": args.exact_max_tokens}
    rows = [row for sp in args.sp for row in measure(sp, settings)]
    elapsed = time.time() - start
    mismatches = [r for r in rows
                  if r["bytes"] != formula(r["method"], tokens=r["tokens"], sp=r["sp"], width=args.width,
                                           batch=args.batch)]
    sps = [2**i for i in range(1, 11)]
    print(f"# Sequence-parallel communication ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, gloo; measured in {elapsed:.0f} s)\n")
    print(f"Measured, width {args.width} (PoM state: v1 {4 * args.width} + 1, v2 {2 * args.width} + 1), "
          f"{args.heads} heads, batch "
          f"{args.batch}, fp32; bytes per rank per layer per training step (forward + backward payload):\n")
    print(measured_table(rows, args.width, args.batch))
    print(f"\nFormulas extrapolated: N = {args.big_tokens:,} tokens, width {args.big_width}, "
          f"{args.big_heads} heads, batch 1, fp32; MiB per rank per layer per training step:\n")
    print(extrapolated_table(args.big_tokens, args.big_width, args.big_heads, sps))
    target = formula("PoM-SP", tokens=32768, sp=4, width=args.width) / formula(
        "Ulysses", tokens=32768, sp=4, width=args.width)
    constant = all(len({r["bytes"] for r in rows if r["method"] == m and r["sp"] == sp}) == 1
                   for sp in args.sp for m in POM_METHODS)
    print(f"\nmeasured == formula for every row: {not mismatches}")
    print(f"PoM-SP bytes independent of N: {constant}")
    print(f"target PoM-SP / Ulysses at N = 32k, P = 4: {target:.2e} (<= 1e-2: {target <= 1e-2})")

    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.out / "sp_communication.png", width=args.width, big_tokens=args.big_tokens,
         big_width=args.big_width, heads=args.big_heads, sps=sps)
    (args.out / "sp_communication.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    print(f"wrote {args.out / 'sp_communication.png'} and {args.out / 'sp_communication.json'}")
    return 0 if not mismatches and constant and target <= 1e-2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
