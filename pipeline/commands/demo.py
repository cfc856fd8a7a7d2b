"""`pomvid demo`: the whole pipeline on this machine, from made videos to a scored model.

    pomvid demo                     # the full demo (about 15 minutes on a 2-core CPU)
    pomvid demo --quick             # a smoke run (CI; the score means nothing)
    pomvid demo --out /tmp/demo     # another output folder

Makes captioned moving-shape videos, precomputes latents with Ray Data, trains with DeepSpeed through
the real launcher (2 CPU processes with sequence parallelism, or all GPUs), tracks everything in MLflow,
samples captions held out of training and scores them with a detector. Running it again into the same
folder resumes (see docs/demo.md).
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the whole pipeline on a made data set and score the model",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument("--quick", action="store_true", help="a smoke run in under 3 minutes (tiny data, few steps)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, training and sampling (default: 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from pipeline.demo.run import DemoError, run_demo

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("pomvid.demo").setLevel(logging.INFO)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database set-up notes are no news here
    if args.seed < 0:
        print(f"pomvid demo: error: --seed {args.seed} must be >= 0", file=sys.stderr)
        return 2
    try:
        run_demo(args.out, quick=args.quick, seed=args.seed)
    except DemoError as err:
        print(f"pomvid demo: error: {err}", file=sys.stderr)
        return 1
    return 0
