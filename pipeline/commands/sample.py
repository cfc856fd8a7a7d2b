"""`pomvid sample`: videos from a trained checkpoint, an MP4 and a GIF preview per prompt.

    pomvid sample --checkpoint runs/demo --prompt "a red square moving up" --out samples/
    pomvid sample --checkpoint runs/x/checkpoints/step_00003000 --prompts-file prompts.txt --seed 7 --out s/
    pomvid sample --checkpoint runs/causal --prompt "..." --sequential --frames 32 --out long/
    pomvid sample --checkpoint runs/XL --prompt "..." --frames 241 --sp 4 --out long/   # 4 GPUs share a video

--checkpoint takes a run folder (the newest complete checkpoint), its checkpoints/ folder, one
step folder or an export folder (pomvid export). The VAE and text encoder are rebuilt from the
latents' manifest the run recorded. Prompt i uses seed + i. Writes <out>/<index>_<prompt>_seed<seed>.mp4 and .gif, and <out>/samples.csv.
--sp N starts the `deepspeed` launcher with N processes (jobs/sample.py) that sample each video together
with sequence parallelism (its frames sharded as in training, pipeline/parallel/sampling.py): the same
videos as --sp 1, for videos one device cannot hold. Rank 0 decodes and writes them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

JOBS_SAMPLE = Path(__file__).resolve().parents[2] / "jobs" / "sample.py"


def register(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="generate videos from a trained checkpoint (MP4 + GIF)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(parser)
    parser.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    """The options of `pomvid sample` on their own (jobs/sample.py under the launcher)."""
    parser = argparse.ArgumentParser(prog="jobs/sample.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return parser


def add_sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run, checkpoints/, step or export folder")
    parser.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    parser.add_argument("--prompts-file", default=None, help="a text file with one caption per line")
    parser.add_argument("--out", required=True, help="output folder for the videos and samples.csv")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default: the training clips')")
    parser.add_argument("--height", type=int, default=None, help="video height in pixels (default: training)")
    parser.add_argument("--width", type=int, default=None, help="video width in pixels (default: training)")
    parser.add_argument("--steps", type=int, default=20, help="ODE solver steps (default: 20)")
    parser.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (default: 3)")
    parser.add_argument("--shift", type=float, default=1.0, help="timestep shift of the schedule (default: 1)")
    parser.add_argument("--solver", choices=("euler", "heun"), default="euler", help="ODE solver (default: euler)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; prompt i uses seed + i (default: 0)")
    parser.add_argument("--sequential", action="store_true",
                        help="frame by frame with the PoM state cache (block-causal models; constant memory)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts denoised together (default: 8)")
    parser.add_argument("--fps", type=float, default=None, help="frame rate of the files (default: the data's)")
    parser.add_argument("--scale", type=int, default=None,
                        help="pixel-repeat factor of the written videos (default: a viewing size)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to sample (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the model's dtype while sampling (bfloat16: the GPU recipes' training dtype)")
    parser.add_argument("--sp", type=int, default=1,
                        help="processes that sample each video together (sequence parallelism; default: 1)")
    parser.add_argument("--master-port", "--master_port", dest="master_port", type=int, default=None,
                        help="the launcher's rendezvous port with --sp > 1 (default: DeepSpeed's)")


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """`deepspeed --num_gpus SP jobs/sample.py ARGS` (this command, once per rank)."""
    import subprocess

    from pipeline.launch import deepspeed_command, launcher_env

    launcher = argparse.Namespace(num_gpus=args.sp, num_nodes=None, hostfile=None, master_port=args.master_port)
    return subprocess.call(deepspeed_command(launcher, JOBS_SAMPLE, "pipeline.commands.sample") + argv,
                           env=launcher_env())


def forwarded_args(args: argparse.Namespace) -> list[str]:
    """The options of `args` again, for the processes the launcher starts."""
    out = ["--checkpoint", args.checkpoint, "--out", args.out, "--steps", str(args.steps), "--cfg", str(args.cfg),
           "--shift", str(args.shift), "--solver", args.solver, "--seed", str(args.seed),
           "--batch-size", str(args.batch_size), "--device", args.device, "--sp", str(args.sp),
           "--dtype", args.dtype]
    for prompt in args.prompt:
        out += ["--prompt", prompt]
    for flag, value in (("--prompts-file", args.prompts_file), ("--frames", args.frames), ("--height", args.height),
                        ("--width", args.width), ("--fps", args.fps), ("--scale", args.scale)):
        if value is not None:
            out += [flag, str(value)]
    return out + (["--sequential"] if args.sequential else [])


def run(args: argparse.Namespace) -> int:
    import os

    if args.sp < 1:
        print(f"pomvid sample: error: --sp {args.sp} must be at least 1", file=sys.stderr)
        return 2
    if args.sp > 1 and "RANK" not in os.environ:
        return _launch(args, forwarded_args(args))
    if args.sp == 1:
        return _sample(args, dims=None, device=args.device)
    # One of the launcher's processes.
    from pipeline.parallel.dims import ParallelDims
    from pipeline.train.distributed import close_distributed, init_distributed

    info = init_distributed()
    try:
        if info.world_size != args.sp:
            print(f"pomvid sample: error: --sp {args.sp} but the launcher started {info.world_size} processes",
                  file=sys.stderr)
            return 2
        return _sample(args, dims=ParallelDims(dp=1, sp=args.sp), device=info.device)
    finally:
        close_distributed()  # also on rank 1.., which return while rank 0 writes the videos


def _sample(args: argparse.Namespace, *, dims, device) -> int:
    from pipeline.generate import SampleError, SampleOptions, VideoGenerator, read_prompts, write_samples

    try:
        prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
        if not prompts:
            raise SampleError("no prompt: give --prompt \"a red square moving left\" (repeatable) or --prompts-file")
        if args.scale is not None and args.scale < 1:
            raise SampleError(f"--scale {args.scale} must be at least 1")
        if args.fps is not None and not args.fps > 0:
            raise SampleError(f"--fps {args.fps} must be > 0")
        options = SampleOptions(frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                                guidance=args.cfg, shift=args.shift, solver=args.solver, seed=args.seed,
                                sequential=args.sequential, batch_size=args.batch_size)
        generator = VideoGenerator.load(args.checkpoint, device=device, dtype=args.dtype)
        generator.latent_shape(options)  # a size the model cannot make fails before any work
        videos = generator.generate(prompts, options, dims=dims)
    except SampleError as err:
        if dims is None or dims.rank == 0:
            print(f"pomvid sample: error: {err}", file=sys.stderr)
        return 2
    if dims is not None and dims.rank != 0:
        return 0  # rank 0 writes the videos
    rows = write_samples(videos, args.out, fps=args.fps or generator.fps, scale=args.scale,
                         checkpoint=generator.checkpoint)
    print(f"sampled {len(rows)} video(s) from {generator.checkpoint} (step {generator.step}) on {generator.device}:")
    for row in rows:
        print(f"  {row['mp4']}  ({row['prompt']!r}, seed {row['seed']}, {row['seconds']:.2f} s)")
    print(f"  previews (GIF) beside them; list: {args.out}/samples.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    """jobs/sample.py: one process of `pomvid sample --sp N` under the launcher."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
