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
    parser = argparse.ArgumentParser(
        prog="jobs/train_ray.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (one process per GPU)")
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="GPUs per worker (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker (default: 1)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS or a local Ray)")
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
    args = build_parser().parse_args(argv)  # parse
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.workers < 1 or args.max_failures < -1:
        print(f"jobs/train_ray.py: need --workers >= 1 and --max-failures >= -1, got {args.workers} and "
              f"{args.max_failures}", file=sys.stderr)
        return 2
    from pipeline.config import ConfigError
    from pipeline.train.entry import checked_resume_args

    try:  # fail here, before any worker starts, when the trainer's arguments are wrong
        train_args = checked_resume_args(train_args)
    except ConfigError as err:
        print(f"jobs/train_ray.py: error: {err}", file=sys.stderr)
        return 2

    import ray  # build
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address=args.ray_address, ignore_reinit_error=True)
    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    resources = {"CPU": args.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train_args": train_args},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=bool(gpus), resources_per_worker=resources),
        run_config=RunConfig(name="pomvid-train", storage_path=_storage_path(train_args),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    try:  # run
        result = trainer.fit()
    except Exception as error:  # Ray wraps the worker's exception; the job must exit non-zero
        print(f"jobs/train_ray.py: training failed: {error}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()  # close
    return 0 if result.error is None else 1


def _storage_path(train_args: list[str]) -> str:
    # Ray Train keeps its own bookkeeping next to our run folder, which every node can see.
    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--output-dir", default="outputs/train")
    out = known.parse_known_args(train_args)[0].output_dir
    return str(Path(out).resolve() / "ray_train")


if __name__ == "__main__":
    sys.exit(main())
