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
import os
import shutil
import subprocess
import sys
from pathlib import Path

JOBS_TRAIN = Path(__file__).resolve().parents[2] / "jobs" / "train.py"


def register(subparsers) -> None:
    from pipeline.train.entry import add_train_args

    parser = subparsers.add_parser("train", help="train a PoM DiT with DeepSpeed (one process or the launcher)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    launcher = parser.add_argument_group("launcher (several processes: runs `deepspeed ... jobs/train.py`)")
    launcher.add_argument("--num_gpus", "--num-gpus", dest="num_gpus", type=int, default=None,
                          help="processes (GPUs) per node; on a CPU-only machine, CPU processes")
    launcher.add_argument("--num_nodes", "--num-nodes", dest="num_nodes", type=int, default=None,
                          help="nodes to use from the hostfile")
    launcher.add_argument("--hostfile", default=None, help="DeepSpeed hostfile (see infra/deepspeed/hostfile.example)")
    launcher.add_argument("--master_port", "--master-port", dest="master_port", type=int, default=None,
                          help="rendezvous port of rank 0 (default: DeepSpeed's 29500)")
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
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    command = [deepspeed]
    for flag, value in (("--num_gpus", args.num_gpus), ("--num_nodes", args.num_nodes),
                        ("--hostfile", args.hostfile), ("--master_port", args.master_port)):
        if value is not None:
            command += [flag, str(value)]
    # From a source checkout the job script; from an installed package the same code as a module.
    command += [str(JOBS_TRAIN)] if JOBS_TRAIN.is_file() else ["--module", "pipeline.train.entry"]
    return command + forwarded_args(args)


def run(args: argparse.Namespace) -> int:
    for name in ("num_gpus", "num_nodes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"pomvid train: error: --{name} must be at least 1, got {value}", file=sys.stderr)
            return 2
    if args.hostfile is not None and not Path(args.hostfile).is_file():
        print(f"pomvid train: error: --hostfile {args.hostfile}: no such file", file=sys.stderr)
        return 2
    several = (args.num_gpus or 1) > 1 or (args.num_nodes or 1) > 1 or args.hostfile is not None
    if not several:
        from pipeline.train.entry import run as run_here

        return run_here(args)
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # CPU processes with gloo
    return subprocess.call(launcher_command(args), env=env)
