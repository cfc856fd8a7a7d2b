#!/usr/bin/env python
"""The `deepspeed` entry point of training: parse -> build -> run -> close.

    deepspeed --num_gpus 8 jobs/train.py --recipe S --data /data/latents --output-dir runs/S --resume auto
    deepspeed --hostfile infra/deepspeed/hostfile.example jobs/train.py --recipe XL --set parallel.sp=2 ...

DeepSpeed's launcher starts one process per GPU (`--local_rank` is accepted and ignored: the
environment carries it). Every option: `python jobs/train.py --help`; the launch scripts are in
jobs/launch/, the recipes and overrides in docs/training.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.train.entry import build_parser, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # parse
    return run(args)  # build -> run -> close (pipeline/train/entry.py)


if __name__ == "__main__":
    sys.exit(main())
