"""`pomvid train`: train a PoM DiT on precomputed latents with DeepSpeed.

    pomvid train --recipe debug --data latents/ --output-dir runs/debug           # one process, here
    pomvid train --recipe S --data latents/ --num_gpus 8 --resume auto             # the deepspeed launcher
    pomvid train --recipe XL --data latents/ --hostfile infra/deepspeed/hostfile.example --num_nodes 2

One process (no --num_gpus/--num_nodes/--hostfile, or 1) runs the trainer in this process; otherwise
the `deepspeed` launcher starts jobs/train.py with the same options. Recipes, --set overrides and
resume: docs/training.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

JOBS_TRAIN = Path(__file__).resolve().parents[2] / "jobs" / "train.py"


def register(subparsers) -> None:
    from pipeline.launch import add_launcher_args
    from pipeline.train.entry import add_train_args

    parser = subparsers.add_parser("train", help="train a PoM DiT with DeepSpeed (one process or the launcher)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    add_launcher_args(parser, "jobs/train.py")
    parser.set_defaults(func=run)


def forwarded_args(args: argparse.Namespace) -> list[str]:
    """The training options of `args` as jobs/train.py arguments."""
    out = ["--recipe", args.recipe, "--resume", args.resume, "--tracking", args.tracking,
           "--experiment", args.experiment]
    for override in args.overrides:
        out += ["--set", override]
    for flag, value in (("--data", args.data), ("--output-dir", args.output_dir),
                        ("--deepspeed_config", args.deepspeed_config), ("--tracking-uri", args.tracking_uri),
                        ("--run-name", args.run_name)):
        if value is not None:
            out += [flag, str(value)]
    if args.print_config:
        out.append("--print-config")
    if args.upload_checkpoints:
        out.append("--upload-checkpoints")
    return out


def launcher_command(args: argparse.Namespace) -> list[str]:
    from pipeline.launch import deepspeed_command

    # From a source checkout the job script; from an installed package the same code as a module.
    return deepspeed_command(args, JOBS_TRAIN, "pipeline.train.entry") + forwarded_args(args)


def run(args: argparse.Namespace) -> int:
    from pipeline.launch import launcher_env, launcher_error, several_processes

    error = launcher_error(args)
    if error:
        print(f"pomvid train: error: {error}", file=sys.stderr)
        return 2
    if not several_processes(args):
        from pipeline.train.entry import run as run_here

        return run_here(args)
    return subprocess.call(launcher_command(args), env=launcher_env())
