#!/usr/bin/env python
"""Train on Ray: the same trainer as `jobs/train.py`, started on Ray Train workers.

    python jobs/train_ray.py --workers 16 --gpus-per-worker 1 -- --recipe S --data /data/latents \
        --output-dir /data/runs/S --resume auto
    pomvid submit train --address http://HEAD:8265 --follow -- --workers 16 -- --recipe S ...

Ray Train's TorchTrainer starts one worker per GPU and sets up the torch.distributed process group
(NCCL on GPUs, gloo on CPUs) and RANK/LOCAL_RANK/WORLD_SIZE; DeepSpeed then initialises over that
group. Everything after `--` goes to the trainer (`python jobs/train.py --help`). The output folder
must be on storage every node sees. When a worker dies (a node lost, an out-of-memory kill), Ray Train
restarts the whole group, up to `--max-failures` times, and the new group continues from the newest
complete checkpoint in the output folder by itself: `--resume none` is checked once, here, and the
workers then run with `--resume auto`. A resubmitted job with `--resume auto` continues the same way.
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
    parser.add_argument("--max-failures", type=int, default=3,
                        help="restarts of the worker group after a worker dies, each from the newest checkpoint "
                        "(default: 3; -1: no limit, 0: fail at once)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the trainer's arguments")
    return parser


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (again after a restart): the trainer's parse -> build -> run -> close."""
    from pipeline.train.entry import build_parser as train_parser
    from pipeline.train.entry import resume_after_restart, run

    args = train_parser().parse_args(config["train_args"])
    args.resume = resume_after_restart(args)
    code = run(args)
    if code != 0:
        raise RuntimeError(f"the trainer exited with code {code} (its log above says why)")


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError
    from pipeline.launch import fit_on_ray
    from pipeline.train.entry import checked_resume_args

    args = build_parser().parse_args(argv)  # parse
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.max_failures < -1:
        print(f"jobs/train_ray.py: --max-failures {args.max_failures} must be -1 (no limit) or more", file=sys.stderr)
        return 2
    if args.workers >= 1:
        try:  # wrong arguments fail here, before any worker starts
            train_args = checked_resume_args(train_args)
        except ConfigError as err:
            print(f"jobs/train_ray.py: error: {err}", file=sys.stderr)
            return 2
    return fit_on_ray(train_loop_per_worker, {"train_args": train_args}, args, name="pomvid-train",  # build, run
                      storage_path=_storage_path(train_args), prog="jobs/train_ray.py",
                      max_failures=args.max_failures)


def _storage_path(train_args: list[str]) -> str:
    # Ray Train keeps its own bookkeeping next to our run folder, which every node can see.
    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--output-dir", default="outputs/train")
    out = known.parse_known_args(train_args)[0].output_dir
    return str(Path(out).resolve() / "ray_train")


if __name__ == "__main__":
    sys.exit(main())
