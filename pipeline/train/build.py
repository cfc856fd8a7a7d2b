"""Building a `Trainer`: processes, data, model, DeepSpeed engine, EMA, resume, tracking, in a fixed order.

    1. process group and device          (pipeline/train/distributed.py)
    2. dp x sp layout and batch split     (RunConfig.layout, ParallelDims)
    3. latent data set, model dims        (the data set's channels / text width win with infer_data_dims)
    4. which checkpoint to resume from    (none / auto / a folder; another world size -> universal);
       every rank sees one output folder, or checkpoints are mirrored (shared_folder.py, mirror.py)
    5. DeepSpeed config                   (ours, a user's JSON merged over it)
    6. model, sequence parallelism, engine (seeded init, under deepspeed.zero.Init for ZeRO-3: no rank
                                          ever holds the whole model; parallelize_pom_dit; our LR schedule)
    7. EMA, text conditioning, resume state, MLflow run
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from pipeline import storage
from pipeline.config import ConfigError, RunConfig
from pipeline.config_overrides import config_to_dict
from pipeline.train import checkpoint as ckpt
from pipeline.train.distributed import barrier, init_distributed
from pipeline.train.mirror import CheckpointMirror, resolve_mirrored_resume
from pipeline.train.shared_folder import check_output_folder

log = logging.getLogger("pomvid.train")
RESUME_MODES = ("none", "auto")


def resolve_resume(resume: str, ckpt_root: Path) -> Path | None:
    """The checkpoint folder to resume from: "none", "auto" (newest complete, or a fresh start) or a folder."""
    if resume == "none":
        existing = ckpt.complete_checkpoints(ckpt_root)
        if existing:
            raise ConfigError(
                f"{ckpt_root} already holds checkpoints (newest: step {existing[-1][0]}); pass --resume auto to "
                "continue that run, or another --output-dir for a new one"
            )
        return None
    if resume == "auto":
        return ckpt.find_latest(ckpt_root)
    folder = Path(resume)
    if (folder / ckpt.LATEST).is_file() or folder.name == "checkpoints":
        found = ckpt.find_latest(folder)
        if found is None:
            raise ConfigError(f"--resume {resume}: no complete checkpoint in that folder")
        return found
    if not ckpt.is_complete(folder):
        raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no {ckpt.COMPLETE} file); "
                          "use --resume auto or a step_XXXXXXXX folder that has one")
    return folder


def build_model(config: RunConfig, ds_config: dict):
    """The PoM DiT of `config`. Under ZeRO-3 it is built inside `deepspeed.zero.Init`: each submodule's
    parameters are partitioned over the ranks as soon as it is built, and the DiT's weight init runs one
    module at a time on gathered parameters (same random draws, so the same weights as without ZeRO-3)."""
    import deepspeed

    from pipeline.models.dit import PoMDiT

    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        return PoMDiT(config.model)

    def gather(module: torch.nn.Module):
        own = list(module.parameters(recurse=False))
        return deepspeed.zero.GatheredParameters(own, modifier_rank=0)

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return PoMDiT(config.model, gather=gather)


def build_trainer(config: RunConfig, *, resume: str = "none", user_deepspeed_config: dict | None = None,
                  tracking: dict | None = None):
    """A ready-to-train `Trainer` (every process calls this)."""
    import deepspeed

    from pipeline.data.load.loader import LatentDataset, LatentLoader
    from pipeline.models.compile import compile_blocks
    from pipeline.parallel.dims import ParallelDims
    from pipeline.parallel.parallelize import parallelize_pom_dit
    from pipeline.tracking import start_run
    from pipeline.train.conditioning import load_or_compute
    from pipeline.train.deepspeed_config import (
        build_deepspeed_config,
        check_batch_keys,
        deep_merge,
        lr_scheduler_factory,
        reapply_schedule,
    )
    from pipeline.train.ema import ShardedEMA
    from pipeline.train.init_from import load_init_weights
    from pipeline.train.metrics import measure_matmul_peak
    from pipeline.train.trainer import Trainer, check_buckets, fit_data_dims
    from pipeline.train.validation import Validator

    # 1-2. processes, layout. What can be checked from files and the launcher's WORLD_SIZE is checked
    # first, so a bad config fails before the slow start of DeepSpeed.
    config.check_training()
    config.layout(int(os.environ.get("WORLD_SIZE", "1")))
    if not config.data.path:
        raise ConfigError("data.path is empty: pass --data FOLDER (a `pomvid precompute` output)")
    if storage.is_remote(config.data.path):
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            storage.preflight(config.data.path, write=False)  # one clear error per node before anything slow
        if not storage.exists(storage.join(config.data.path, "manifest.json")):
            raise ConfigError(f"data.path={storage.redact(config.data.path)}: no manifest.json there; is it a "
                              "`pomvid precompute` output?")
    elif not Path(config.data.path, "manifest.json").is_file():
        raise ConfigError(f"data.path={config.data.path}: no manifest.json there; is it a `pomvid precompute` output?")
    output_dir = Path(config.train.output_dir)
    ckpt_root = output_dir / "checkpoints"
    resume_dir = resolve_resume(resume, ckpt_root)
    mirror_uri = config.train.checkpoint_mirror
    if mirror_uri and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        storage.preflight(mirror_uri)  # one clear error per node before anything slow starts
    info = init_distributed()
    # Every rank must see the same output folder, unless complete checkpoints live in the mirror.
    sharing = check_output_folder(output_dir, rank=info.rank, world_size=info.world_size, device=info.device,
                                  mirror=mirror_uri)
    mirror = None
    if mirror_uri:
        if resume in RESUME_MODES:
            resume_dir = resolve_mirrored_resume(mirror_uri, ckpt_root, resume=resume, local=resume_dir,
                                                 shared=sharing.shared, owner=sharing.owner, rank=info.rank,
                                                 device=info.device)
        mirror = CheckpointMirror(mirror_uri, rank=info.rank, world_size=info.world_size,
                                  keep=config.train.keep_checkpoints, device=info.device)
        if info.is_main:
            log.info("checkpoints are mirrored to %s (output folder %s)", storage.redact(mirror_uri),
                     "shared by all ranks" if sharing.shared else "local to each node")
    layout = config.layout(info.world_size)
    dims = ParallelDims(dp=layout.dp, sp=layout.sp)
    # 3. data
    dataset = LatentDataset(config.data.path)
    config = fit_data_dims(config, dataset)
    check_buckets(config, dataset, dims)
    loader = LatentLoader(dataset, batch_size=layout.per_rank_batch, dp_rank=dims.dp_rank, dp_size=layout.dp,
                          seed=config.data.seed, drop_last=config.data.drop_last)
    # 4. resume
    saved = ckpt.read_state(resume_dir) if resume_dir is not None else None
    universal = saved is not None and saved["world_size"] != info.world_size
    # 5. DeepSpeed config (the model build under ZeRO-3 needs it)
    ds_config = build_deepspeed_config(config, layout, device_type=info.device.type)
    if user_deepspeed_config:
        check_batch_keys(user_deepspeed_config, layout)
        ds_config = deep_merge(ds_config, user_deepspeed_config)
    load_dir = resume_dir
    if universal:
        load_dir = ckpt.ensure_universal(resume_dir, rank=info.rank, barrier=barrier, owner=sharing.owner)
        ds_config = deep_merge(ds_config, {"checkpoint": {"load_universal": True}})
    # 6. model, sequence parallelism, engine
    torch.manual_seed(config.train.seed)
    model = build_model(config, ds_config)
    if config.train.init_from and saved is None:
        source = load_init_weights(model, config.train.init_from)
        if info.is_main:
            log.info("initial weights: %s", source)
    model.set_activation_checkpointing(config.engine.activation_checkpointing)
    parallelize_pom_dit(model, dims)
    compile_blocks(model, config.model.compile)  # last: compiles what SP and checkpointing made
    scheduler = None if "scheduler" in ds_config else lr_scheduler_factory(config)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config,
                                           lr_scheduler=scheduler)
    # 7. EMA, conditioning, resume, tracking
    ema = ShardedEMA(engine.module, config.train.ema_decay, device=info.device)
    conditioning = load_or_compute(config, dataset, output_dir=output_dir, is_main=info.is_main, device=info.device)
    start_step, counters, run_id = 0, {}, None
    if saved is not None:
        engine.load_checkpoint(str(load_dir), tag=ckpt.DS_TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        if scheduler is not None:  # ours, not a scheduler of the user's DeepSpeed JSON
            reapply_schedule(engine.lr_scheduler, engine.lr_scheduler.optimizer, config)
        loader.load_state_dict(saved["loader"])
        ema_state = ckpt.load_ema(resume_dir)
        if ema_state is not None:
            ema.load_full_state_dict(ema_state)
        rng = None if universal else ckpt.load_rng(resume_dir, info.rank)
        if rng is not None:
            ckpt.set_rng_state(rng)
        start_step, counters, run_id = int(saved["step"]), saved.get("counters", {}), saved.get("mlflow_run_id")
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config_to_dict(config), indent=1))
        (output_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1))
        # The latents' manifest names the VAE and text encoder: `pomvid sample` needs it after the latents go.
        ckpt.write_atomic(output_dir / "latents_manifest.json", json.dumps(dataset.manifest, indent=1))
        if saved is not None:
            log.info("resumed from %s (step %d%s)", resume_dir, start_step, ", universal" if universal else "")
    tracking = dict(tracking or {})
    # The resolved process layout sits beside the config: parallel.dp may be 0 (= world size / sp).
    run_params = {**config_to_dict(config), "layout": dataclasses.asdict(layout)}
    tracker = start_run(config=run_params, output_dir=output_dir, rank=info.rank, run_id=run_id,
                        deepspeed_config=ds_config, **tracking)
    peak = None
    if info.device.type == "cuda":
        peak = config.train.peak_tflops * 1e12 if config.train.peak_tflops else measure_matmul_peak(info.device)
    # The first SP group (ranks 0..sp-1) samples validation videos together, in the training dtype.
    validator = Validator(config, config.model, conditioning, manifest=dataset.manifest, output_dir=output_dir,
                          device=info.device, dims=dims, dtype=next(engine.module.parameters()).dtype
                          ) if dims.dp_rank == 0 else None
    barrier()
    return Trainer(config=config, layout=layout, info=info, dims=dims, dataset=dataset, loader=loader, engine=engine,
                   ema=ema, conditioning=conditioning, tracker=tracker, validator=validator, ds_config=ds_config,
                   start_step=start_step, counters=counters, peak_flops=peak, mirror=mirror, sharing=sharing)
