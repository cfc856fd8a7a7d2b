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
import subprocess
import sys
from pathlib import Path

JOBS_EVAL = Path(__file__).resolve().parents[2] / "jobs" / "eval.py"


def register(subparsers) -> None:
    from pipeline.eval.entry import add_eval_args
    from pipeline.launch import add_launcher_args

    parser = subparsers.add_parser("eval", help="generate videos and score them: CLIP score and FVD",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser)
    add_launcher_args(parser, "jobs/eval.py")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.eval.entry import forwarded_args
    from pipeline.eval.entry import run as run_here
    from pipeline.launch import deepspeed_command, launcher_env, launcher_error, several_processes

    error = launcher_error(args)
    if error:
        print(f"pomvid eval: error: {error}", file=sys.stderr)
        return 2
    if not several_processes(args):
        return run_here(args)
    command = deepspeed_command(args, JOBS_EVAL, "pipeline.eval.entry") + forwarded_args(args)
    return subprocess.call(command, env=launcher_env())
