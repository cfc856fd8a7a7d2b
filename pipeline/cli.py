"""The `pomvid` command.

Each subcommand lives in its own module under `pipeline.commands` and exposes
`register(subparsers)`, which adds its parser and sets `func` to a callable taking the parsed args and
returning an exit code. Modules are imported lazily per name so that `pomvid --help` stays fast and a
subcommand's heavy imports (ray, deepspeed, mlflow) happen only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline import __version__

# Subcommand name -> module in pipeline.commands. Keep sorted by the order a user meets them.
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "precompute": "precompute",
    "submit": "submit",
    "train": "train",
    "sample": "sample",
    "eval": "eval",
    "export": "export",
    "bench": "bench",
    "runs": "runs",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pomvid",
        description="Text-to-video diffusion with the Polynomial Mixer: precompute latents with Ray, "
        "train with DeepSpeed, track in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"pomvid {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(f"pipeline.commands.{module_name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
