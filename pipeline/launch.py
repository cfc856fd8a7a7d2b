"""Starting a job on several processes: the `deepspeed` launcher (`pomvid train|eval --num_gpus N`) and
Ray Train workers (jobs/train_ray.py, jobs/eval_ray.py). One place for the flags and the plumbing."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path


def add_launcher_args(parser: argparse.ArgumentParser, script: str) -> None:
    launcher = parser.add_argument_group(f"launcher (several processes: runs `deepspeed ... {script}`)")
    launcher.add_argument("--num_gpus", "--num-gpus", dest="num_gpus", type=int, default=None,
                          help="processes (GPUs) per node; on a CPU-only machine, CPU processes")
    launcher.add_argument("--num_nodes", "--num-nodes", dest="num_nodes", type=int, default=None,
                          help="nodes to use from the hostfile")
    launcher.add_argument("--hostfile", default=None, help="DeepSpeed hostfile (see infra/deepspeed/hostfile.example)")
    launcher.add_argument("--master_port", "--master-port", dest="master_port", type=int, default=None,
                          help="rendezvous port of rank 0 (default: DeepSpeed's 29500)")


def launcher_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the launcher options, or None."""
    for name in ("num_gpus", "num_nodes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name} must be at least 1, got {value}"
    if args.hostfile is not None and not Path(args.hostfile).is_file():
        return f"--hostfile {args.hostfile}: no such file"
    return None


def several_processes(args: argparse.Namespace) -> bool:
    return (args.num_gpus or 1) > 1 or (args.num_nodes or 1) > 1 or args.hostfile is not None


def deepspeed_command(args: argparse.Namespace, script: Path, module: str) -> list[str]:
    """`deepspeed [launcher options] SCRIPT` (from a source checkout) or `--module MODULE` (installed)."""
    command = [shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")]
    for flag, value in (("--num_gpus", args.num_gpus), ("--num_nodes", args.num_nodes),
                        ("--hostfile", args.hostfile), ("--master_port", args.master_port)):
        if value is not None:
            command += [flag, str(value)]
    return command + ([str(script)] if script.is_file() else ["--module", module])


def launcher_env() -> dict:
    """This environment, with DeepSpeed's CPU accelerator (gloo processes) where no GPU is visible."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


# -- Ray Train --------------------------------------------------------------------------------------


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (one process per GPU)")
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="GPUs per worker (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker (default: 1)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS or a local Ray)")


def fit_on_ray(loop: Callable[[dict], None], loop_config: dict, args: argparse.Namespace, *, name: str,
               storage_path: str, prog: str, max_failures: int = 0) -> int:
    """Run `loop(loop_config)` on `args.workers` Ray Train workers (TorchTrainer sets up the process group:
    NCCL on GPUs, gloo on CPUs, and RANK/LOCAL_RANK/WORLD_SIZE); 0 when every worker finished. When a
    worker dies, Ray Train restarts the whole group and calls `loop` again, up to `max_failures` times."""
    if args.workers < 1:
        print(f"{prog}: --workers {args.workers} must be at least 1", file=sys.stderr)
        return 2
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address=args.ray_address, ignore_reinit_error=True)
    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    resources = {"CPU": args.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=bool(gpus), resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    try:
        result = trainer.fit()
    except Exception as error:  # Ray wraps the worker's exception; the job must exit non-zero
        print(f"{prog}: {name} failed: {error}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0 if result.error is None else 1
