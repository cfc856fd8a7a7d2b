#!/usr/bin/env python
"""Train on Ray: the same trainer as `jobs/train.py`, started on Ray Train workers.

    python jobs/train_ray.py --workers 16 --gpus-per-worker 1 -- --recipe S --data /data/latents \
        --output-dir /data/runs/S --resume auto
    pomvid submit train --address http://HEAD:8265 --follow -- --workers 16 -- --recipe S ...

Ray Train's TorchTrainer starts one worker per GPU and sets up the torch.distributed process group
(NCCL on GPUs, gloo on CPUs) and RANK/LOCAL_RANK/WORLD_SIZE; DeepSpeed then initialises over that
group. Everything after `--` goes to the trainer unchanged (`python jobs/train.py --help`). The
output folder must be on storage every node sees: a resubmitted job with `--resume auto` continues
from the newest complete checkpoint there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a source checkout (or Ray's uploaded working dir) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    from pipeline.launch import add_ray_args

    parser = argparse.ArgumentParser(
        prog="jobs/train_ray.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_ray_args(parser)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the trainer's arguments")
    return parser


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: the trainer's own parse -> build -> run -> close."""
    from pipeline.train.entry import build_parser as train_parser
    from pipeline.train.entry import run

    code = run(train_parser().parse_args(config["train_args"]))
    if code != 0:
        raise RuntimeError(f"the trainer exited with code {code} (its log above says why)")


def main(argv: list[str] | None = None) -> int:
    from pipeline.launch import fit_on_ray

    args = build_parser().parse_args(argv)  # parse
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.workers >= 1:
        train_parser_check(train_args)
    return fit_on_ray(train_loop_per_worker, {"train_args": train_args}, args, name="pomvid-train",  # build, run
                      storage_path=_storage_path(train_args), prog="jobs/train_ray.py")


def train_parser_check(train_args: list[str]) -> None:
    """Fail on the submitting side, before any worker starts, when the trainer's arguments are wrong."""
    from pipeline.train.entry import build_parser as train_parser

    train_parser().parse_args(train_args)


def _storage_path(train_args: list[str]) -> str:
    # Ray Train keeps its own bookkeeping next to our run folder, which every node can see.
    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--output-dir", default="outputs/train")
    out = known.parse_known_args(train_args)[0].output_dir
    return str(Path(out).resolve() / "ray_train")


if __name__ == "__main__":
    sys.exit(main())
