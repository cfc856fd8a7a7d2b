"""The trainer's step does not synchronise with the host per micro-batch, and a non-finite loss on ONE
rank still skips the step on every rank.

Two gloo processes (dp=2, ZeRO-2) build the real trainer (`build_trainer`, DeepSpeed engine) on a tiny
latent set. Host synchronisations are counted by wrapping the Tensor methods that read a value to the
host (`item`, `tolist`, `numpy`, `__bool__`, `__float__`, `__int__`) during `train_step` + `_after_step`:
the count of a step with 4 micro-batches per rank equals that of a step with 1 (DeepSpeed's own overflow
check reads once per optimizer step; our code reads nothing between log points). Then one sample of
rank 1 holds a NaN: both ranks skip that step and keep their weights. The same processes check that
ZeRO-3 builds the model partitioned with the unsharded weights, that bf16 runs reduce and accumulate
gradients in fp32 (engine.grad_dtype), and that the EMA follows DeepSpeed's fp32 masters (ZeRO-3 and bf16
ZeRO-1) with each rank keeping only its partition and rank 0 alone receiving the full EMA.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tests.deepspeed_launch import write_latents
from tests.distributed.harness import run_distributed

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


class _HostReads:
    """Counts calls of the Tensor methods that copy a value to the host, while active."""

    def __init__(self):
        self.count, self._saved = 0, {}

    def __enter__(self):
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def _trainer(data: str, out: str, *, micro: int, extra: list[str] = ()):
    from pipeline.config import get_recipe
    from pipeline.config_overrides import apply_overrides
    from pipeline.train.build import build_trainer

    config = apply_overrides(get_recipe("debug"), [
        f"data.path={data}", f"train.output_dir={out}", "data.global_batch_size=8", f"data.micro_batch_size={micro}",
        "engine.zero_stage=2", "train.log_every=100", "train.checkpoint_every=0", "validation.every=0", *extra])
    return build_trainer(config, tracking={"enabled": False})


def _counted_steps(trainer, steps: int) -> list[int]:
    counts, batches = [], trainer._batches()
    for _ in range(steps):
        batch = next(batches)
        with _HostReads() as reads:
            result = trainer.train_step(batch)
            trainer.step += 1
            result.step = trainer.step
            trainer._after_step(result)
        counts.append(reads.count)
    trainer.flush_steps()
    return counts


def _worker(rank: int, world: int, base: str) -> dict:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_SIZE": str(world), "DS_ACCELERATOR": "cpu"})
    base_path = Path(base)
    result = {}
    for micro in (4, 1):  # 1 and 4 micro-batches per rank (8 samples per step, dp=2)
        trainer = _trainer(str(base_path / "clean"), str(base_path / f"micro{micro}"), micro=micro)
        result[f"reads_{micro}"] = _counted_steps(trainer, 3)
    # A NaN sample on rank 1 only, in step 1: every rank skips it and keeps its weights.
    trainer = _trainer(str(base_path / "nan"), str(base_path / "nan_run"), micro=1)
    before = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    batch = next(trainer._batches())
    result["nan_on_this_rank"] = bool(torch.isnan(batch["latents"]).any())
    step = trainer.train_step(batch)
    result["skipped"] = step.skipped
    result["unchanged"] = all(torch.equal(before[n], p.detach()) for n, p in trainer.engine.module.named_parameters())
    result["loss_finite"] = bool(torch.isfinite(step.loss))
    result.update(_zero3_and_grad_dtype(str(base_path / "clean"), base_path))
    return result


def _zero3_and_grad_dtype(data: str, base: Path) -> dict:
    """ZeRO-3 builds partitioned (deepspeed.zero.Init) with the weights of an unsharded build; a bf16 run
    reduces and accumulates gradients in fp32."""
    import deepspeed

    from pipeline.models.dit import PoMDiT

    out = {}
    trainer = _trainer(data, str(base / "zero3"), micro=4, extra=["engine.zero_stage=3"])
    params = dict(trainer.engine.module.named_parameters())
    out["partitioned"] = all(p.ds_tensor.numel() < p.ds_numel for p in params.values() if p.ds_numel >= 64)
    torch.manual_seed(trainer.config.train.seed)
    reference = dict(PoMDiT(trainer.config.model).named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        out["zero3_init_differs"] = [n for n, p in params.items() if not torch.equal(p.data, reference[n].data)]
    out["zero3_ema"] = _ema_of_masters(trainer)
    # train.init_from into a ZeRO-3 partitioned model (before DeepSpeed builds its masters).
    from safetensors.torch import save_file

    from pipeline.train.build import build_model
    from pipeline.train.init_from import load_init_weights

    weights = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, (n, p) in
               enumerate(reference.items())}
    if torch.distributed.get_rank() == 0:
        save_file(weights, str(base / "init.safetensors"))
    torch.distributed.barrier()
    model = build_model(trainer.config, trainer.ds_config)
    load_init_weights(model, str(base / "init.safetensors"))
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        out["zero3_init_from_differs"] = [n for n, p in model.named_parameters() if not torch.equal(p.data, weights[n])]
    trainer = _trainer(data, str(base / "bf16"), micro=4, extra=["engine.zero_stage=1", "engine.precision=bf16"])
    out["bf16_dtypes"] = [str(d) for d in (*trainer.engine.get_data_types(), trainer.engine.communication_data_type)]
    out["bf16_ema"] = _ema_of_masters(trainer)
    return out


def _ema_of_masters(trainer) -> dict:
    """One applied step with EMA decay 0.5: rank 0's full EMA is the average of the fp32 masters before and
    after (read with DeepSpeed's public safe_get_full_fp32_param); each rank keeps only its partition."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(trainer.engine.module.named_parameters())
    trainer.ema.decay = 0.5
    before = {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()}
    start = trainer.ema.full_state_dict()
    applied = not trainer.train_step(next(trainer._batches())).skipped
    trainer.ema.update()
    after = {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()}
    full = trainer.ema.full_state_dict()
    total = sum(t.numel() for t in before.values())
    out = {"applied": applied, "local_fraction": trainer.ema.local_numel() / total, "full_is_none": full is None,
           "rank": torch.distributed.get_rank()}
    if full is not None:
        out["start_error"] = max(float((start[n] - before[n].cpu()).abs().max()) for n in params)
        out["error"] = max(float((full[n] - (before[n] + after[n]).cpu() / 2).abs().max()) for n in params)
        # The masters are not the module's (bf16) weights in a bf16 run: averaging those would differ.
        out["masters_vs_module"] = max(float((after[n] - p.detach().float()).abs().max()) for n, p in params.items()
                                       if p.numel() == after[n].numel())
    return out


def test_host_reads_do_not_grow_with_micro_batches_and_one_rank_nan_skips_everywhere(tmp_path):
    from pipeline.data.load.loader import LatentDataset, LatentLoader

    clean = write_latents(tmp_path / "clean")
    # The first sample of rank 1's part of step 1 (global batch 8, dp=2, seed 0) gets a NaN.
    loader = LatentLoader(LatentDataset(clean), batch_size=4, dp_rank=1, dp_size=2, seed=0)
    write_latents(tmp_path / "nan", nan_samples=(int(loader.plan(0)[0][1][4]),))
    ranks = run_distributed(_worker, 2, str(tmp_path))
    for rank, r in enumerate(ranks):
        # The first step reads more (DeepSpeed's lazy set-up); afterwards a step costs the same host
        # reads whatever the number of micro-batches.
        assert r["reads_4"][1:] == r["reads_1"][1:], f"rank {rank}: {r['reads_4']} vs {r['reads_1']}"
        assert max(r["reads_1"][1:]) <= 4, f"rank {rank}: {r['reads_1']} host reads per step"
        assert r["skipped"] and r["unchanged"] and not r["loss_finite"], f"rank {rank}: {r}"
    assert [r["nan_on_this_rank"] for r in ranks] == [False, True]
    for rank, r in enumerate(ranks):
        assert r["partitioned"] and r["zero3_init_differs"] == [] and r["zero3_init_from_differs"] == []
        assert r["bf16_dtypes"] == ["torch.bfloat16", "torch.float32", "torch.float32"]
        for name in ("zero3_ema", "bf16_ema"):
            ema = r[name]
            assert ema["applied"] and ema["full_is_none"] == (rank != 0), f"rank {rank} {name}: {ema}"
            assert ema["local_fraction"] < 0.52, f"rank {rank} {name}: keeps more than its partition: {ema}"
    for name in ("zero3_ema", "bf16_ema"):
        ema = ranks[0][name]
        assert ema["start_error"] == 0 and ema["error"] < 1e-6, f"{name}: {ema}"
    assert ranks[0]["bf16_ema"]["masters_vs_module"] > 0
