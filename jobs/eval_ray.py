#!/usr/bin/env python
"""Evaluate on Ray: `pomvid eval` on Ray Train workers, each generating and scoring its share of the videos.

    python jobs/eval_ray.py --workers 8 -- --checkpoint /data/runs/S --prompts /data/latents_heldout \
        --num-videos 2048 --real /data/real_clips --i3d /weights/i3d_pretrained_400.pt \
        --clip-model /weights/clip --out /data/eval/S
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/eval_ray.py --workers 8 -- ...

Ray Train's TorchTrainer starts one worker per GPU and sets up the process group and RANK/WORLD_SIZE;
the evaluation uses that group (pipeline/eval/run.py). Everything after `--` goes to the evaluation
unchanged (`python jobs/eval.py --help`). --out, the checkpoint and the real clips must be on storage
every node sees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a source checkout (or Ray's uploaded working dir) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    from pipeline.launch import add_ray_args

    parser = argparse.ArgumentParser(prog="jobs/eval_ray.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ray_args(parser)
    parser.add_argument("eval_args", nargs=argparse.REMAINDER, help="-- then `pomvid eval`'s arguments")
    return parser


def eval_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: the evaluation's own parse -> build -> run -> close."""
    from pipeline.eval.entry import build_parser as eval_parser
    from pipeline.eval.entry import run

    code = run(eval_parser().parse_args(config["eval_args"]))
    if code != 0:
        raise RuntimeError(f"the evaluation exited with code {code} (its log above says why)")


def main(argv: list[str] | None = None) -> int:
    from pipeline.eval.entry import build_parser as eval_parser
    from pipeline.launch import fit_on_ray

    args = build_parser().parse_args(argv)  # parse
    eval_args = args.eval_args[1:] if args.eval_args[:1] == ["--"] else args.eval_args
    out = Path(eval_parser().parse_args(eval_args).out).resolve()  # wrong arguments fail here, before any worker
    return fit_on_ray(eval_loop_per_worker, {"eval_args": eval_args}, args, name="pomvid-eval",  # build, run, close
                      storage_path=str(out / "ray_train"), prog="jobs/eval_ray.py")


if __name__ == "__main__":
    sys.exit(main())
