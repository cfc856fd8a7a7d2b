"""`pomvid eval`: generate videos from a checkpoint and score them (CLIP score, FVD), into the training run.

    pomvid eval --checkpoint runs/S --prompts prompts.txt --num-videos 256 --clip-model /weights/clip \
        --real /data/real_clips --i3d /weights/i3d_pretrained_400.pt --out eval/S
    pomvid eval --checkpoint runs/S --prompts /data/latents_heldout --num-videos 2048 --num_gpus 8 ... # launcher

One process here, or with --num_gpus/--num_nodes/--hostfile the `deepspeed` launcher starts
jobs/eval.py on every GPU, each generating its share. Results: <out>/eval.json and, when the run's
MLflow store is found, metrics eval/fvd and eval/clip_score at the checkpoint's step. Details and the
protocol: docs/eval.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

JOBS_EVAL = Path(__file__).resolve().parents[2] / "jobs" / "eval.py"


def register(subparsers) -> None:
    from pipeline.eval.entry import add_eval_args

    parser = subparsers.add_parser("eval", help="generate videos and score them: CLIP score and FVD",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser)
    launcher = parser.add_argument_group("launcher (several processes: runs `deepspeed ... jobs/eval.py`)")
    launcher.add_argument("--num_gpus", "--num-gpus", dest="num_gpus", type=int, default=None,
                          help="processes (GPUs) per node; on a CPU-only machine, CPU processes")
    launcher.add_argument("--num_nodes", "--num-nodes", dest="num_nodes", type=int, default=None,
                          help="nodes to use from the hostfile")
    launcher.add_argument("--hostfile", default=None, help="DeepSpeed hostfile")
    launcher.add_argument("--master_port", "--master-port", dest="master_port", type=int, default=None,
                          help="rendezvous port of rank 0 (default: DeepSpeed's 29500)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.eval.entry import forwarded_args
    from pipeline.eval.entry import run as run_here

    several = (args.num_gpus or 1) > 1 or (args.num_nodes or 1) > 1 or args.hostfile is not None
    if not several:
        return run_here(args)
    if args.hostfile is not None and not Path(args.hostfile).is_file():
        print(f"pomvid eval: error: --hostfile {args.hostfile}: no such file", file=sys.stderr)
        return 2
    launcher = [shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")]
    for flag, value in (("--num_gpus", args.num_gpus), ("--num_nodes", args.num_nodes),
                        ("--hostfile", args.hostfile), ("--master_port", args.master_port)):
        if value is not None:
            launcher += [flag, str(value)]
    script = [str(JOBS_EVAL)] if JOBS_EVAL.is_file() else ["--module", "pipeline.eval.entry"]
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return subprocess.call(launcher + script + forwarded_args(args), env=env)

