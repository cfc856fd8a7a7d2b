"""The evaluation entry point shared by `pomvid eval`, `deepspeed ... jobs/eval.py` and jobs/eval_ray.py:
parse -> build -> run -> close."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--checkpoint", required=True, help="run folder, checkpoints/, step folder or export folder")
    what.add_argument("--prompts", required=True,
                      help="text file (one prompt per line) or a latent data set (folder or its manifest.json) "
                           "whose captions are used")
    what.add_argument("--out", required=True, help="folder for videos/*.mp4 and eval.json")
    what.add_argument("--num-videos", type=int, default=64, help="videos to generate (default: 64)")
    what.add_argument("--seeds", type=int, nargs="+", default=[0],
                      help="one base seed (video i uses seed + i) or one seed per video (default: 0)")
    fvd = parser.add_argument_group("FVD (I3D features of generated vs real clips)")
    fvd.add_argument("--real", default=None, help="real clips: a folder of videos or a CSV/JSONL/Parquet manifest")
    fvd.add_argument("--num-real", type=int, default=None, help="real clips to use (default: --num-videos)")
    fvd.add_argument("--i3d", default=None, help="local file with the Kinetics-400 I3D weights (.pt or .safetensors)")
    fvd.add_argument("--fvd-resolution", type=int, default=224, help="frame size I3D sees (default: 224, standard)")
    fvd.add_argument("--real-stats", default=None,
                     help="real-statistics file to use or create (refused when made with another protocol)")
    fvd.add_argument("--real-stats-dir", default=None,
                     help="cache folder of real statistics (default: $POMVID_FVD_CACHE or ~/.cache/pomvid/fvd_real_stats)")
    clip = parser.add_argument_group("CLIP score (open_clip image-text similarity)")
    clip.add_argument("--clip-model", default=None, help="open_clip local-dir, hf-hub:org/repo, or a checkpoint file")
    clip.add_argument("--clip-model-name", default=None, help="architecture of a checkpoint-file --clip-model")
    sampling = parser.add_argument_group("sampling (part of the protocol)")
    sampling.add_argument("--frames", type=int, default=None, help="frames per video (default: training clips')")
    sampling.add_argument("--height", type=int, default=None, help="height in pixels (default: training)")
    sampling.add_argument("--width", type=int, default=None, help="width in pixels (default: training)")
    sampling.add_argument("--fps", type=float, default=None, help="frame rate (default: the data's)")
    sampling.add_argument("--steps", type=int, default=30, help="sampler steps (default: 30)")
    sampling.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (default: 3)")
    sampling.add_argument("--shift", type=float, default=1.0, help="timestep shift (default: 1)")
    sampling.add_argument("--solver", choices=("euler", "heun"), default="euler", help="ODE solver (default: euler)")
    sampling.add_argument("--sequential", action="store_true", help="frame-sequential (block-causal models)")
    sampling.add_argument("--batch-size", type=int, default=8, help="videos per batch and process (default: 8)")
    sampling.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: auto)")
    tracking = parser.add_argument_group("MLflow")
    tracking.add_argument("--tracking", choices=("auto", "on", "off"), default="auto",
                          help="auto: log into the training run when its store is found; on: must; off: never")
    tracking.add_argument("--tracking-uri", default=None,
                          help="MLflow store (default: MLFLOW_TRACKING_URI, else the run folder's mlflow.db)")
    tracking.add_argument("--experiment", default="pomvid",
                          help="experiment of the run made when the checkpoint names none (default: pomvid)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobs/eval.py", description=__doc__)
    add_eval_args(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser


def forwarded_args(args: argparse.Namespace) -> list[str]:
    """The evaluation options of `args` as jobs/eval.py arguments (those that differ from the defaults)."""
    out: list[str] = []
    for action in build_parser()._actions:
        if not action.option_strings or action.dest in ("help", "local_rank"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, *(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out


def config_from_args(args: argparse.Namespace):
    from pipeline.eval.config import EvalConfig

    return EvalConfig(
        checkpoint=args.checkpoint, prompts=args.prompts, out=args.out, num_videos=args.num_videos, seeds=args.seeds,
        real=args.real, num_real=args.num_real, i3d=args.i3d, fvd_resolution=args.fvd_resolution,
        real_stats=args.real_stats, real_stats_dir=args.real_stats_dir, clip_model=args.clip_model,
        clip_model_name=args.clip_model_name, frames=args.frames, height=args.height, width=args.width, fps=args.fps,
        steps=args.steps, guidance=args.cfg, shift=args.shift, solver=args.solver, sequential=args.sequential,
        batch_size=args.batch_size, device=args.device, tracking=args.tracking, tracking_uri=args.tracking_uri,
        experiment=args.experiment, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from pipeline.eval.config import EvalError
    from pipeline.eval.log import log_result, resolve_store
    from pipeline.eval.real import RealStatsMismatch
    from pipeline.tracking.uri import TrackingError

    try:
        config = config_from_args(args)  # build
        result = run_eval_closing(config)  # run
    except (EvalError, RealStatsMismatch, FileNotFoundError, ValueError, OSError) as err:
        print(f"pomvid eval: error: {err}", file=sys.stderr)
        return 2
    if result is None:  # not rank 0
        return 0
    out = Path(config.out)
    uri = resolve_store(config.tracking, config.tracking_uri, result)
    if uri is None and config.tracking == "on":
        print("pomvid eval: error: --tracking on but no MLflow store: pass --tracking-uri or set MLFLOW_TRACKING_URI "
              f"(results are in {out / 'eval.json'})", file=sys.stderr)
        return 1
    logged = None
    if uri is not None:
        try:
            logged = log_result(result, uri=uri, experiment=config.experiment, out_dir=out)
        except TrackingError as err:
            print(f"pomvid eval: error: {err} (results are in {out / 'eval.json'})", file=sys.stderr)
            return 1
    _report(result, logged, out)
    return 0


def run_eval_closing(config):
    """run_eval, then the process group is closed so a launcher's processes exit cleanly."""
    import torch.distributed as dist

    from pipeline.eval.run import run_eval

    result = run_eval(config)  # on an error the process exits and the launcher stops the others: no barrier
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def _report(result: dict, logged: dict | None, out: Path) -> None:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
    print(f"evaluated {result['checkpoint']} (step {result['step']}) on {result['world_size']} process(es): {metrics}")
    print(f"  protocol {result['protocol_id']}: {result['protocol_summary']}")
    real = result.get("real_stats")
    if real:
        print(f"  real statistics ({real['source']}): {real['path']} ({real['used']} clips, "
              f"{len(real['failures'])} failed)")
    print(f"  videos: {out / 'videos'}; results: {out / 'eval.json'}")
    if logged:
        print(f"  MLflow run {logged['run_id']} at {logged['tracking_uri']}: "
              + ", ".join(f"{k}={v:.4f}" for k, v in logged["metrics"].items()) + f" at step {result['step']}")
    else:
        print("  not logged to MLflow (no store found; pass --tracking-uri)")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
