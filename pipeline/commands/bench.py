"""`pomvid bench NAME [ARGS...]`: run one of the benchmark scripts of benchmarks/ and print its table.

    pomvid bench list
    pomvid bench pom_vs_attention --tokens 4096 16384
    pomvid bench sp_communication
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> list[str]:
    if not BENCHMARKS_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCHMARKS_DIR.glob("*.py") if not p.name.startswith("_"))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark script from benchmarks/ (`pomvid bench list` lists them)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", help="benchmark name, or `list`")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    parser.set_defaults(func=run)


def run(args) -> int:
    names = available()
    if not names:
        print(
            f"pomvid bench: no benchmarks/ folder next to the package ({BENCHMARKS_DIR}); benchmarks run "
            "from a source checkout (`pip install -e .`)",
            file=sys.stderr,
        )
        return 2
    if args.name == "list":
        print("\n".join(names))
        return 0
    name = args.name.replace("-", "_")
    if name not in names:
        print(f"pomvid bench: unknown benchmark {args.name!r}; choose one of {', '.join(names)}", file=sys.stderr)
        return 2
    script = BENCHMARKS_DIR / f"{name}.py"
    saved_argv = sys.argv
    sys.argv = [str(script), *args.bench_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:  # a benchmark's argparse or main may exit
        return int(stop.code or 0) if not isinstance(stop.code, str) else 1
    finally:
        sys.argv = saved_argv
    return 0
