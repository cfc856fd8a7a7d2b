"""The DeepSpeed trainer: train() -> train_step() -> forward_backward_step().

Gradient reduction over dp x sp (verified per ZeRO stage in tests/distributed/
test_deepspeed_grad_reduction.py): DeepSpeed gets no mpu, so its data-parallel group is the whole
world and ZeRO 1, 2 and 3 all AVERAGE gradients over dp * sp ranks. Each SP rank's loss is its share
of the sample's loss (the shares sum to the sample's loss), so the world average is 1/sp of the wanted
DP average; the SP loss factor (pipeline/parallel/loss.py, "world") multiplies every loss by sp.

Host synchronisation: none per micro-batch. A rank whose loss is not finite backpropagates it
multiplied by NaN (`torch.where` on the device, no `.item()`), so its gradients are NaN; DeepSpeed's
gradient reduction (all-reduce or reduce-scatter over the world, every ZeRO stage) carries the NaN to
every rank's gradients, and DeepSpeed's overflow / global-norm check (itself one all-reduce and one
host read per optimizer step) skips the optimizer step and the LR scheduler on every rank alike and
zeroes the gradients. The step counts as skipped (no EMA update); `train.max_nonfinite_steps` in a row
stop the run with a checkpoint. Losses stay on the device (one all-reduce per step, no host read);
the step records (steps.jsonl, MLflow) are read to the host once per logging interval, at a checkpoint
and when a step was skipped (tests/distributed/test_train_host_syncs.py counts the reads).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.config import ConfigError, Layout, RunConfig
from pipeline.config_overrides import config_to_dict
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.loss import deepspeed_loss_factor, sequence_parallel_loss
from pipeline.parallel.parallelize import comm_counter
from pipeline.train import checkpoint as ckpt
from pipeline.train.distributed import DistInfo, all_reduce_sum, barrier, close_distributed
from pipeline.train.faults import pause_point
from pipeline.train.inputs import MicroBatch, prepare_micro_batch
from pipeline.train.metrics import StepMeter
from pipeline.train.mirror import prune_local_copies
from pipeline.train.shared_folder import FolderSharing

log = logging.getLogger("pomvid.train")


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a non-finite loss; the run stopped with a checkpoint."""


@dataclass(kw_only=True)
class StepResult:
    loss: torch.Tensor | float
    """The global batch's loss (mean over samples), as single-process training would compute it: a 0-d
    device tensor until the step records are read to the host (`Trainer.flush_steps`), then a float."""
    skipped: bool
    """No optimizer update happened (non-finite loss or gradients)."""
    grad_norm: torch.Tensor | float | None
    """DeepSpeed's global gradient norm (None when skipped); a tensor until flushed, like `loss`."""
    lr: float
    """Learning rate this step used."""
    seconds: float
    tokens: int
    """Video tokens of the global batch."""
    step: int = 0
    """Optimizer steps done after this one (the number steps.jsonl records)."""
    indices: list[int] | None = None
    """Data-set indices of the global batch (rank 0 only)."""
    latent_shape: tuple[int, ...] = ()
    """(C, T, H, W) of the batch's latents (for the FLOPs of the step)."""
    text_len: int = 0
    """Caption tokens of the batch (for the FLOPs of the step)."""


def fit_data_dims(config: RunConfig, dataset) -> RunConfig:
    """The model's in_channels / text_dim from the data set (infer_data_dims) or a clear mismatch error."""
    sample = dataset[0]
    channels, text_dim = int(sample["latent"].shape[0]), int(sample["text"].shape[1])
    model = config.model
    if (model.in_channels, model.text_dim) == (channels, text_dim):
        return config
    if not config.infer_data_dims:
        raise ConfigError(
            f"the latents in {dataset.root} have {channels} channels and {text_dim}-wide text embeddings, the model "
            f"expects in_channels={model.in_channels}, text_dim={model.text_dim}; --set model.in_channels={channels} "
            f"model.text_dim={text_dim} or infer_data_dims=true"
        )
    return replace(config, model=replace(model, in_channels=channels, text_dim=text_dim))


def check_buckets(config: RunConfig, dataset, dims: ParallelDims) -> None:
    for bucket in dataset.manifest["buckets"]:
        _, frames, height, width = (int(v) for v in bucket["latent_shape"])
        try:
            config.model.check_latent_shape(frames, height, width)
            dims.check_frames(frames // config.model.patch_t)
        except ValueError as err:
            raise ConfigError(f"bucket {bucket['key']} of {dataset.root}: {err}") from None


class Trainer:
    """Owns the engine, the loader, the EMA and the tracker of one run; see `pipeline.train.build`."""

    def __init__(self, *, config: RunConfig, layout: Layout, info: DistInfo, dims: ParallelDims, dataset, loader,
                 engine, ema, conditioning, tracker, validator, ds_config: dict, start_step: int, counters: dict,
                 peak_flops: float | None, mirror=None, sharing=None):
        self.config, self.layout, self.info, self.dims = config, layout, info, dims
        self.dataset, self.loader, self.engine, self.ema = dataset, loader, engine, ema
        self.cond, self.tracker, self.validator, self.ds_config = conditioning, tracker, validator, ds_config
        self.step = start_step
        self.nonfinite_total = int(counters.get("nonfinite_total", 0))
        self.nonfinite_in_row = int(counters.get("nonfinite_in_row", 0))
        self.output_dir = Path(config.train.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        self.loss_factor = deepspeed_loss_factor(dims, "world")
        self.dtype = next(engine.module.parameters()).dtype
        self.meter = StepMeter(config.model, world_size=info.world_size, device=info.device, peak_flops=peak_flops)
        self.mirror = mirror  # CheckpointMirror (train.checkpoint_mirror) or None
        self.sharing = sharing or FolderSharing(shared=True, owner=info.is_main)
        self._saved_step = start_step if start_step else None
        self._validated_step = start_step if start_step else None  # a finished run resumed: nothing to redo
        self.comm = comm_counter(engine.module)  # SP collectives, aggregated per logging window
        self._pending: list[StepResult] = []  # steps whose loss / norm are still device tensors

    # -- the loop -----------------------------------------------------------------------------------

    def _batches(self):
        while True:  # the loader yields the rest of an epoch, then moves to the next one
            yield from self.loader

    def _global_indices(self) -> list[int]:
        """Data-set indices of the next global batch (rank 0 logs them: no sample repeated or skipped)."""
        state = self.loader.state_dict()
        plan = self.loader.plan(state["epoch"])
        return [int(i) for i in plan[state["samples_consumed"] // self.loader.global_batch_size][1]]

    def train(self) -> dict:
        """Run to `train.steps` (or `train.stop_at`); returns a summary."""
        cfg = self.config.train
        end = cfg.stop_at or cfg.steps
        batches = self._batches()
        if self.info.is_main:
            log.info("training steps %d -> %d: %s", self.step, end, self.layout)
        while self.step < end:
            indices = self._global_indices() if self.info.is_main else []
            result = self.train_step(next(batches))
            self.step += 1
            result.step, result.indices = self.step, indices
            self._after_step(result)
        self.flush_steps()
        if self._saved_step != self.step:
            self.save_checkpoint()
        self.finish_mirror()
        if self.config.validation.every and self._validated_step != self.step:
            self.validate()
        return {"step": self.step, "nonfinite_total": self.nonfinite_total}

    def _after_step(self, result: StepResult) -> None:
        cfg = self.config.train
        self._pending.append(result)
        if result.skipped:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
            self.flush_steps()  # rare: the warning says what the loss was
            if self.info.is_main:
                log.warning("step %d: non-finite loss %s, optimizer step skipped (%d in a row)", self.step,
                            result.loss, self.nonfinite_in_row)
        else:
            self.nonfinite_in_row = 0
            self.ema.update()
        if self.step % cfg.log_every == 0 or result.skipped:
            self.flush_steps()
            self._log_metrics(result)
        if self.nonfinite_in_row >= cfg.max_nonfinite_steps:
            folder = self.save_checkpoint()
            self.finish_mirror()
            raise NonFiniteLossError(
                f"{self.nonfinite_in_row} steps in a row (up to step {self.step}) had a non-finite loss; stopped "
                f"with a checkpoint of the last good weights in {folder}. Check the data for NaN/inf latents, "
                "lower optim.lr or raise train.max_nonfinite_steps"
            )
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if self.config.validation.every and self.step % self.config.validation.every == 0:
            self.validate()

    def flush_steps(self) -> None:
        """Read the pending steps' losses and norms to the host (one synchronisation for all of them),
        append them to steps.jsonl (rank 0) and the step meter."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        device_values = [r.loss for r in pending] + [r.grad_norm for r in pending if torch.is_tensor(r.grad_norm)]
        start = time.perf_counter()
        values = iter(torch.stack([v.detach().float().reshape(()).to(self.info.device) for v in device_values])
                      .tolist())
        pending[-1].seconds += time.perf_counter() - start  # the queued device work finished while we waited
        for r in pending:
            r.loss = next(values)
        for r in pending:
            if torch.is_tensor(r.grad_norm):
                r.grad_norm = next(values)
            elif r.grad_norm is not None:
                r.grad_norm = float(r.grad_norm)
        records = []
        for r in pending:
            finite = math.isfinite(r.loss)
            if not finite and not r.skipped:
                raise RuntimeError(f"step {r.step}: DeepSpeed applied an optimizer step although the loss was not "
                                   "finite; the weights may be corrupt: resume from the last checkpoint")
            self.meter.add(seconds=r.seconds, samples=self.layout.global_batch_size, tokens=r.tokens,
                           latent_shape=r.latent_shape, text_len=r.text_len, loss=None if r.skipped else r.loss)
            records.append({"step": r.step, "loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr,
                            "skipped": r.skipped, "indices": r.indices})
        if self.info.is_main:
            with open(self.output_dir / "steps.jsonl", "a") as handle:
                handle.write("".join(json.dumps(record) + "\n" for record in records))

    def _log_metrics(self, result: StepResult) -> None:
        metrics = {"train/loss": result.loss, "train/lr": result.lr, "train/skipped_steps": self.nonfinite_total,
                   "train/epoch": self.loader.epoch, **self.meter.metrics(), **self.loader.perf_metrics()}
        if result.grad_norm is not None:
            metrics["train/grad_norm"] = result.grad_norm
        window = self.comm.take_window() if self.comm is not None else {"steps": 0}
        if self.dims.sp > 1 and window["steps"]:
            # Payload bytes this rank contributed to SP collectives per optimizer step, by autograd pass.
            metrics["sp/bytes_per_step/forward"] = window["forward"] / window["steps"]
            metrics["sp/bytes_per_step/backward"] = window["backward"] / window["steps"]
        self.meter.reset()
        if self.info.is_main:
            self.tracker.log_metrics(metrics, step=self.step)
            log.info("step %d %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def train_step(self, batch: dict) -> StepResult:
        """One optimizer step over this rank's part of a global batch (grad_accum micro-batches)."""
        start = time.perf_counter()
        lr = float(self.engine.get_lr()[0])
        device, micro = self.info.device, self.layout.micro_batch_size
        latents = batch["latents"].to(device)  # (per_rank_batch, C, T, H, W), the full videos
        text, text_mask = batch["text"].to(device), batch["text_mask"].to(device)
        first = self.dims.dp_rank * self.layout.per_rank_batch  # position of our first sample in the batch
        loss_sum, tokens = torch.zeros((), device=device), 0
        for m in range(self.layout.grad_accum):
            part = slice(m * micro, (m + 1) * micro)
            mb = prepare_micro_batch(
                latents[part], text[part], text_mask[part], positions=list(range(first + m * micro, first + (m + 1) * micro)),
                step=self.step, seed=self.config.train.seed, flow=self.config.flow, patch_t=self.config.model.patch_t,
                patch_size=self.config.model.patch_size, null_text=self.cond.null_text.to(device),
                null_mask=self.cond.null_mask.to(device), dims=self.dims, dtype=self.dtype)
            loss_sum += self.forward_backward_step(mb)
            tokens += mb.tokens * self.layout.dp
        # Sum of the SP shares, mean over DP groups and micro-batches: the loss single-process training
        # would report. One all-reduce per step, read to the host later (flush_steps).
        loss = all_reduce_sum(loss_sum) / (self.dims.dp * self.layout.grad_accum)
        if self.comm is not None:
            self.comm.next_step()
        applied = self.engine.was_step_applied()  # DeepSpeed's overflow check already synchronised
        norm = self.engine.get_global_grad_norm() if applied else None
        return StepResult(loss=loss, skipped=not applied, grad_norm=norm, lr=lr,
                          seconds=time.perf_counter() - start, tokens=tokens,
                          latent_shape=tuple(latents.shape[1:]), text_len=int(text.shape[1]))

    def forward_backward_step(self, mb: MicroBatch) -> torch.Tensor:
        """Forward, loss, backward of one micro-batch; returns this rank's share of its loss (0-d, fp32,
        on the device: no host synchronisation)."""
        local = mb.local
        pred = self.engine(local.latents, local.timesteps, mb.text, mb.text_mask, local.shard.frame_mask,
                           local.shard.frame_offset)  # (B, C, T_local, H, W)
        loss = sequence_parallel_loss(pred, local.extras["target"], local.shard, mb.loss_frame_mask)
        pause_point(self.step + 1, self.info.rank)  # fault injection for tests (POMVID_FAULT_PAUSE); else a no-op
        # A non-finite loss makes this rank's gradients NaN; the gradient reduction carries the NaN to every
        # rank and DeepSpeed's overflow check skips the step everywhere (module docstring).
        factor = torch.where(torch.isfinite(loss.detach()), self.loss_factor, float("nan")).to(loss.dtype)
        self.engine.backward(loss * factor)
        self.engine.step()  # the optimizer step happens at the accumulation boundary
        return loss.detach().float()

    # -- checkpoints, validation, close ------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        self.flush_steps()  # steps.jsonl covers every step the checkpoint holds
        ema_state = self.ema.full_state_dict()  # a collective; rank 0 gets the full EMA, the others None
        state = {
            "loader": self.loader.state_dict(),
            "counters": {"nonfinite_total": self.nonfinite_total, "nonfinite_in_row": self.nonfinite_in_row},
            "mlflow_run_id": getattr(self.tracker, "run_id", None),
            "world_size": self.info.world_size, "dp": self.dims.dp, "sp": self.dims.sp,
            "zero_stage": self.config.engine.zero_stage, "config": config_to_dict(self.config),
        }
        self.finish_mirror()  # the previous upload first: local retention must not delete files in flight
        folder = ckpt.save(self.engine, self.ckpt_root, self.step, ema_state=ema_state,
                           trainer_state=state, rank=self.info.rank, barrier=barrier, owner=self.sharing.owner)
        self._saved_step = self.step
        if self.mirror is not None:
            self.mirror.upload(folder, self.step)  # in the background
        if self.info.is_main:
            ckpt.prune(self.ckpt_root, self.config.train.keep_checkpoints)
            self.tracker.log_checkpoint(folder, step=self.step)
            log.info("checkpoint %s", folder)
        elif self.sharing.owner:  # a node-local folder, never complete here: the mirror holds the checkpoint
            prune_local_copies(self.ckpt_root, self.config.train.keep_checkpoints)
        return folder

    def finish_mirror(self) -> None:
        """Wait until this rank's last checkpoint upload is done (every rank; raises on every rank if one failed)."""
        if self.mirror is not None:
            self.mirror.wait()

    def validate(self) -> None:
        ema_state = self.ema.full_state_dict()  # a collective; rank 0 gets the full EMA, the others None
        if self.validator is not None:  # the first SP group samples together (pipeline/train/validation.py)
            start = time.perf_counter()
            written = self.validator.run(ema_state, self.step, self.tracker)
            if self.info.is_main:
                self.tracker.log_metrics({"validation/seconds": time.perf_counter() - start}, step=self.step)
                log.info("validation at step %d: %s", self.step, ", ".join(p.name for p in written))
        del ema_state
        self._validated_step = self.step
        barrier()

    def close(self, status: str = "FINISHED") -> None:
        self.tracker.end(status)
        if status == "FAILED":
            return  # other ranks may be gone: no collective, the launcher tears the processes down
        barrier()
        close_distributed()
