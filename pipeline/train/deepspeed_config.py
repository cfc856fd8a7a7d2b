"""The DeepSpeed config built from our dataclasses, a user's own JSON merged over it, and the LR schedule.

Batch sizes: DeepSpeed's data-parallel group is the whole world (dp * sp ranks: we pass it no mpu), so
DeepSpeed counts every SP rank as a data-parallel replica. Its `train_batch_size` is therefore
micro_batch_size x grad_accum x world_size, which is our global batch x sp: the SP ranks of a group
read the same samples. The gradient DeepSpeed averages over the world is corrected by the SP loss
factor (pipeline/parallel/loss.py, verified in tests/distributed/test_deepspeed_grad_reduction.py).

Optimizer: AdamW. Without offload it is `torch.optim.AdamW` (DeepSpeed's "torch_adam": no JIT-built
kernel to compile at start, identical math); with `offload_optimizer` DeepSpeed's CPU Adam.
LR schedule: our `WarmupCosine` in a LambdaLR handed to `deepspeed.initialize`; DeepSpeed saves and
restores its state with every checkpoint (exact resume). A "scheduler" key in the user's JSON replaces
it (DeepSpeed then builds that one). A skipped step (non-finite gradients) does not advance it.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from pipeline.config import ConfigError, Layout, RunConfig


def resolve_precision(precision: str, device_type: str) -> str:
    """"auto" -> bf16 on an accelerator, fp32 on the CPU; an explicit choice is kept (bf16 on a CPU is slow
    but allowed for tests)."""
    if precision == "auto":
        return "fp32" if device_type == "cpu" else "bf16"
    return precision


def build_deepspeed_config(config: RunConfig, layout: Layout, *, device_type: str) -> dict:
    """DeepSpeed's JSON config for `config` on `layout` (world size, dp, sp, accumulation)."""
    engine, optim = config.engine, config.optim
    bf16 = resolve_precision(engine.precision, device_type) == "bf16"
    zero: dict = {"stage": engine.zero_stage}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type != "cpu"}
    params = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    if not engine.offload_optimizer:
        params["torch_adam"] = True  # torch.optim.AdamW: nothing to JIT-compile, same update
    ds = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        # DeepSpeed's replicas are all world_size ranks (SP ranks included), see the module docstring.
        "train_batch_size": layout.micro_batch_size * layout.grad_accum * layout.world_size,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": params},
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # we log ourselves, on rank 0
        "wall_clock_breakdown": False,
    }
    if bf16:
        # Gradient reduction across ranks and accumulation over micro-batches in engine.grad_dtype
        # (float32 by default; DeepSpeed's default for bf16 is bf16 for both). ZeRO-1 then runs DeepSpeed's
        # BF16 optimizer, ZeRO-2/3 keep their fp32 accumulation buffers.
        dtype = {"float32": "fp32", "bfloat16": "bf16"}[engine.grad_dtype]
        ds["communication_data_type"] = dtype
        ds["data_types"] = {"grad_accum_dtype": dtype}
    if engine.offload_optimizer:
        # DeepSpeed's CPU Adam is the supported optimizer for offload.
        ds["zero_force_ds_cpu_optimizer"] = True
    return ds


def deep_merge(ours: dict, theirs: dict) -> dict:
    """`ours` with every key of `theirs` replacing it, recursively for nested dicts (key by key)."""
    merged = copy.deepcopy(ours)
    for key, value in theirs.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_user_deepspeed_config(path: str | Path) -> dict:
    """A user's DeepSpeed JSON (`--deepspeed_config`), with a clear error when it cannot be read."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"--deepspeed_config {path}: cannot read the file ({err})") from None
    except ValueError as err:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed_config {path}: must hold a JSON object, got {type(data).__name__}")
    return data


def check_batch_keys(ds: dict, layout: Layout) -> None:
    """A user JSON may not change the batch split: the loader, the resume and the loss depend on it."""
    expected = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.micro_batch_size * layout.grad_accum * layout.world_size,
    }
    for key, value in expected.items():
        if key in ds and ds[key] != value:
            raise ConfigError(
                f"--deepspeed_config sets {key}={ds[key]}, but data.global_batch_size / micro_batch_size and "
                f"the world size give {value}; set the batch with --set data.global_batch_size=... and "
                "data.micro_batch_size=... instead"
            )


class WarmupCosine:
    """LR multiplier of optimizer step s (0-based): linear warmup to 1 over `warmup` steps, then cosine to
    `min_ratio` at step `total` - 1 (or constant). A callable object so LambdaLR can save it."""

    def __init__(self, *, warmup: int, total: int, min_ratio: float, decay: str = "cosine"):
        self.warmup, self.total, self.min_ratio, self.decay = int(warmup), int(total), float(min_ratio), decay

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total - 1 - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedule(config: RunConfig) -> WarmupCosine:
    return WarmupCosine(warmup=config.optim.warmup_steps, total=config.train.steps,
                        min_ratio=config.optim.min_lr_ratio, decay=config.optim.decay)


def lr_scheduler_factory(config: RunConfig):
    """A callable DeepSpeed calls with its optimizer to build our LambdaLR."""
    import torch

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(config))


def reapply_schedule(scheduler, optimizer, config: RunConfig) -> None:
    """After a checkpoint load: keep the restored step count but take the schedule's shape and peak LR
    from the current config (a resume may extend train.steps or change optim.lr); identical when
    nothing changed."""
    schedule = make_schedule(config)
    scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
    scheduler.base_lrs = [config.optim.lr] * len(optimizer.param_groups)
    lrs = [base * schedule(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
