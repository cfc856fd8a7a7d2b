"""The training command line shared by `jobs/train.py` (under the `deepspeed` launcher) and `pomvid train`.

    --recipe NAME                 debug | S | B | XL (pipeline/config.py)
    --set FIELD.PATH=VALUE        change any config field (repeatable), e.g. --set optim.lr=3e-4
    --data FOLDER                 = --set data.path=FOLDER
    --output-dir FOLDER           = --set train.output_dir=FOLDER
    --resume none|auto|FOLDER     continue from the newest complete checkpoint (auto) or a given one
    --deepspeed_config FILE       a DeepSpeed JSON merged over ours, key by key
    --print-config                print the resolved config as JSON and exit
plus the MLflow options of pipeline/tracking (--tracking, --tracking-uri, --experiment, --run-name).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pipeline.config import RECIPES, ConfigError, RunConfig, get_recipe
from pipeline.storage import StorageError


def add_train_args(parser: argparse.ArgumentParser) -> None:
    from pipeline.tracking.cliargs import add_tracking_args

    parser.add_argument("--recipe", default="debug", help=f"named config: {', '.join(RECIPES)} (default: debug)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD.PATH=VALUE",
                        help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--data", default=None, help="latent data set folder (= --set data.path=...)")
    parser.add_argument("--output-dir", default=None, help="run folder (= --set train.output_dir=...)")
    parser.add_argument("--resume", default="none",
                        help="none (default; refuses a folder with checkpoints), auto (newest complete checkpoint "
                        "in the output dir, or a fresh start) or a checkpoint folder")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                        help="a DeepSpeed JSON whose keys override ours, key by key")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_tracking_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobs/train.py", description="Train a PoM DiT with DeepSpeed.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_train_args(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The recipe with --data, --output-dir and every --set applied (ConfigError names what is wrong)."""
    from pipeline.config_overrides import apply_overrides

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={args.output_dir}")
    return apply_overrides(get_recipe(args.recipe), overrides)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    logging.getLogger("pomvid").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """Parse -> build -> run -> close; returns the exit code (2: bad config, 1: the run failed)."""
    from pipeline.config_overrides import config_to_dict
    from pipeline.tracking.cliargs import tracking_kwargs
    from pipeline.train.deepspeed_config import load_user_deepspeed_config

    setup_logging()
    rank = int(os.environ.get("RANK", "0"))
    try:
        config = config_from_args(args)
        if args.print_config:
            print(json.dumps(config_to_dict(config), indent=1))
            return 0
        if args.resume not in ("none", "auto") and not os.path.isdir(args.resume):
            raise ConfigError(f"--resume {args.resume!r}: use none, auto or an existing checkpoint folder")
        user_ds = load_user_deepspeed_config(args.deepspeed_config) if args.deepspeed_config else None
        from pipeline.train.build import build_trainer

        trainer = build_trainer(config, resume=args.resume, user_deepspeed_config=user_ds,
                                tracking=tracking_kwargs(args))
    except ConfigError as err:
        if rank == 0:
            print(f"pomvid train: error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:  # this node's credentials, endpoint or network: said by every rank that has it
        print(f"pomvid train: error (rank {rank}): {err}", file=sys.stderr)
        return 2
    from pipeline.train.trainer import NonFiniteLossError

    status = "FAILED"
    try:
        trainer.train()
        status = "FINISHED"
        return 0
    except NonFiniteLossError as err:
        print(f"pomvid train: error: {err}", file=sys.stderr)
        return 1
    finally:
        trainer.close(status)


# -- Ray Train restarts (jobs/train_ray.py) --------------------------------------------------------------


def checked_resume_args(train_args: list[str]) -> list[str]:
    """The trainer's arguments for Ray Train workers, checked once where the job is submitted: bad
    arguments or config raise (SystemExit, ConfigError) before any worker starts, and `--resume none`
    on an output folder without checkpoints becomes `--resume auto`, so a worker group that Ray Train
    restarts after a worker died continues from the newest checkpoint instead of refusing the folder."""
    from pathlib import Path

    from pipeline.train.build import resolve_resume

    args = build_parser().parse_args(train_args)
    config = config_from_args(args)
    if args.resume != "none":
        return list(train_args)
    resolve_resume("none", Path(config.train.output_dir) / "checkpoints")  # ConfigError when it has some
    return [*train_args, "--resume", "auto"]  # argparse keeps the last value


def resume_after_restart(args: argparse.Namespace) -> str:
    """A Ray Train worker's --resume: a checkpoint FOLDER given at submission until this job has written
    a newer checkpoint into its output folder (a restarted group continues from that one)."""
    from pathlib import Path

    from pipeline.train import checkpoint as ckpt
    from pipeline.train.build import resolve_resume

    if args.resume in ("none", "auto"):
        return args.resume
    root = Path(config_from_args(args).train.output_dir) / "checkpoints"
    latest, given = ckpt.find_latest(root), resolve_resume(args.resume, root)
    newer = latest is not None and ckpt.read_state(latest)["step"] > ckpt.read_state(given)["step"]
    return "auto" if newer else args.resume


if __name__ == "__main__":
    sys.exit(run(build_parser().parse_args()))
