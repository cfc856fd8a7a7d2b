"""Offline latent precomputation with Ray Data: videos + captions -> Parquet shards of latents.

    plan (streamed manifest -> work units with stable ids, minus the finished ones: plan/*.parquet)
    -> decode (CPU tasks) -> VAE (actors) -> text (actors) -> write one shard per unit (atomic)
    -> index.parquet (appended per batch of units) ; manifest.json (small header) ; errors/<ab>/*.jsonl

Ray Data streams the units through the stages with backpressure, so only a few units per stage are in
memory at once. Resume: a unit whose shard exists (one listing of shards/) is skipped, and a shard
only appears, whole, once its unit is done; so a run killed at any moment and started again writes
exactly the missing units.
The output is tied to its encoders, buckets and settings (recorded in manifest.json before the
first shard): a run with others is refused unless `overwrite=True`. See docs/precompute.md.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import pyarrow.compute as pc

from pipeline import storage
from pipeline.data.encode.fingerprint import NON_IDENTITY_FIELDS, fingerprint_diff
from pipeline.data.precompute.checks import PrecomputeError, check_output_is_shared, preflight
from pipeline.data.precompute.config import PrecomputeConfig
from pipeline.data.precompute.stages import (
    TextStage,
    VAEStage,
    decode_units,
    stable_hash,
    write_units,
)
from pipeline.data.source.plan import PLAN_DIR, Plan, plan_run
from pipeline.data.store.index import INDEX_NAME, INDEX_PARTS_DIR, IndexAppender, finish_manifest, list_output
from pipeline.data.store.shards import (
    ERRORS_DIR,
    MANIFEST_NAME,
    SHARDS_DIR,
    ShardError,
    read_output_manifest,
    write_output_manifest,
)
from pipeline.data.store.text_conditioning import from_bytes, write_text_conditioning

__all__ = ["PrecomputeConfig", "PrecomputeError", "check_output_is_shared", "format_summary", "preflight",
           "run_precompute"]
SETTING_FIELDS = ("fps", "clips_per_video", "storage_dtype", "rows_per_work_unit")


def _init_ray(config: PrecomputeConfig) -> bool:
    """Join the configured / job's cluster, or start a small local Ray. True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = config.ray_address
    env = os.environ.get("RAY_ADDRESS", "")
    if address is None and env and not env.startswith(("http://", "https://")):
        address = "auto"  # running as a Ray job (or after `ray start`): RAY_ADDRESS names the cluster
    if address is not None:
        ray.init(address=address)
    else:  # "local": ignore a job-server RAY_ADDRESS (http://...) meant for `ray job submit`
        # 127.0.0.1: a local Ray's servers are reachable from this machine only.
        ray.init(address="local", num_cpus=local_ray_cpus(config), include_dashboard=False,
                 _node_ip_address="127.0.0.1")
    return True


def minimum_cpus(config: PrecomputeConfig) -> float:
    """Logical CPUs the pipeline needs to make progress: every encoder actor, one decode and one write task.
    With fewer, the actors hold every CPU and no decode task is ever scheduled (a silent hang)."""
    return (config.vae_num_cpus * config.vae_concurrency + config.text_num_cpus * config.text_concurrency
            + config.decode_num_cpus + config.write_num_cpus)


def local_ray_cpus(config: PrecomputeConfig) -> int:
    """Logical CPUs of a local Ray: the machine's (or --ray-num-cpus), raised to what the stages reserve.

    Ray's CPUs are reservations, not cores: on a 2-core laptop the VAE actor, the text actor and the
    decode tasks must still all fit, and the OS shares the cores between them."""
    wanted = config.ray_num_cpus or os.cpu_count() or 1
    needed = math.ceil(minimum_cpus(config))
    if config.ray_num_cpus and config.ray_num_cpus < needed:
        print(f"precompute: --ray-num-cpus {config.ray_num_cpus} is below the {needed} CPUs the stages reserve "
              f"(encoder actors + one decode + one write task); starting the local Ray with {needed}",
              file=sys.stderr, flush=True)
    return max(wanted, needed)


def warn_if_cluster_too_small(config: PrecomputeConfig, cluster_cpus: float) -> None:
    """Say so when the stages cannot all run at once on the cluster as it is now (an autoscaling
    cluster may still add nodes, so this waits rather than fails)."""
    needed = minimum_cpus(config)
    if cluster_cpus < needed:
        print(
            f"precompute: warning: the Ray cluster has {cluster_cpus:g} CPUs now but the stages reserve {needed:g} "
            f"(VAE actors {config.vae_concurrency} x {config.vae_num_cpus:g}, text actors {config.text_concurrency}"
            f" x {config.text_num_cpus:g}, decode {config.decode_num_cpus:g}, write {config.write_num_cpus:g}); "
            "waiting for nodes (or lower --vae-num-cpus/--text-num-cpus/--decode-num-cpus)",
            file=sys.stderr, flush=True,
        )


def describe_vae(kind: str, build_kwargs: dict, buckets: str) -> dict:
    from pipeline.data.decode.buckets import parse_buckets
    from pipeline.data.encode.vae_factory import build_vae

    vae = build_vae(kind, **build_kwargs)
    shapes = {}
    for b in parse_buckets(buckets):
        try:
            shapes[b.name] = list(vae.latent_shape(b.frames, b.height, b.width))
        except ValueError as err:
            raise PrecomputeError(f"bucket {b.name} does not suit the {kind} VAE: {err}") from None
    latent = {"channels": vae.latent_channels, "temporal_compression": vae.temporal_compression,
              "spatial_compression": vae.spatial_compression, "scaling_factor": vae.scaling_factor,
              "shift_factor": vae.shift_factor}
    return {"fingerprint": vae.fingerprint(), "latent_shapes": shapes, "latent": latent}


def describe_text(kind: str, build_kwargs: dict, prompts: list[str] | None = None,
                  storage_dtype: str = "float32") -> dict:
    """Fingerprint and width of the text encoder, and (with `prompts` not None) the text conditioning:
    the safetensors bytes of the null caption's and the prompts' embeddings (see encode_conditioning)."""
    from pipeline.data.encode.text_factory import build_text_encoder

    encoder = build_text_encoder(kind, **build_kwargs)
    out = {"fingerprint": encoder.fingerprint(), "dim": encoder.dim, "max_length": encoder.max_length}
    if prompts is not None:
        out["conditioning"] = encode_conditioning(encoder, prompts, storage_dtype=storage_dtype)
    return out


def encode_conditioning(encoder, prompts: list[str], *, storage_dtype: str) -> bytes:
    """text_conditioning.safetensors's bytes: "" and every prompt encoded like a caption (valid tokens
    only), rounded to the shards' storage dtype so that the null caption matches the captions' precision."""
    import torch

    from pipeline.data.store.shards import STORAGE_DTYPES
    from pipeline.data.store.text_conditioning import TextConditioning, pad_embeddings, to_bytes

    def valid_tokens(captions: list[str]) -> list[torch.Tensor]:
        out = []
        for first in range(0, len(captions), 32):
            emb, mask = encoder.encode(captions[first:first + 32])  # (B, L, D), (B, L)
            out += [e[m].to(STORAGE_DTYPES[storage_dtype]).float().cpu() for e, m in zip(emb, mask)]
        return out

    null = valid_tokens([""])[0]  # (L0, D)
    null_mask = torch.ones(null.shape[0], dtype=torch.bool)
    if null.shape[0] == 0:  # an encoder whose "" has no valid token: one masked-out zero token
        null, null_mask = torch.zeros(1, encoder.dim), torch.zeros(1, dtype=torch.bool)
    prompt_text = prompt_mask = None
    if prompts:
        prompt_text, prompt_mask = pad_embeddings(valid_tokens(list(prompts)), encoder.dim)  # (P, L, D), (P, L)
    return to_bytes(TextConditioning(null_text=null, null_mask=null_mask, prompts=list(prompts),
                                     prompt_text=prompt_text, prompt_mask=prompt_mask,
                                     text_encoder=encoder.fingerprint()))


def describe_encoders(config: PrecomputeConfig) -> tuple[dict, dict]:
    """Load each encoder once: fingerprints, latent shapes, text dim, the text conditioning's bytes.

    An encoder that runs on GPU actors is loaded in a Ray task with the same GPUs (the driver may be a
    small head node); a CPU one is loaded right here, which saves starting a worker.
    """
    import ray

    # The text conditioning is encoded where the text actors run (a GPU worker for a T5-XXL), not on
    # a driver that may have no GPU.
    text_args = (config.text_encoder, config.text_build_kwargs(), config.read_validation_prompts(),
                 config.storage_dtype)
    jobs = ((describe_vae, (config.vae, config.vae_build_kwargs(), str(config.bucket_table())),
             config.vae_num_cpus, config.num_gpus_per_actor),
            (describe_text, text_args, config.text_num_cpus, config.text_gpus))
    refs = [ray.remote(fn).options(num_cpus=cpus, num_gpus=gpus).remote(*args) if gpus else None
            for fn, args, cpus, gpus in jobs]
    out = []
    for (fn, args, _, _), ref in zip(jobs, refs):
        try:
            out.append(fn(*args) if ref is None else ray.get(ref))
        except ray.exceptions.RayTaskError as err:
            cause = err.cause
            if isinstance(cause, PrecomputeError):
                raise cause from None
            raise PrecomputeError(f"loading the encoders failed: {type(cause).__name__}: {cause}") from None
    return out[0], out[1]


def _identity(fp: dict) -> dict:
    return {k: v for k, v in fp.items() if k not in NON_IDENTITY_FIELDS}


def build_output_manifest(config: PrecomputeConfig, vae: dict, text: dict, records: int) -> dict:
    """manifest.json's content before the first shard (status "running")."""
    table = config.bucket_table()
    settings = {name: getattr(config, name) for name in SETTING_FIELDS}
    identity = {"vae": _identity(vae["fingerprint"]), "text": _identity(text["fingerprint"]),
                "buckets": str(table), **settings}
    return {
        "status": "running",
        "vae": vae["fingerprint"],
        "text_encoder": text["fingerprint"],
        "latent": {**vae["latent"], "dtype": config.storage_dtype},
        "text": {"dim": text["dim"], "max_length": text["max_length"], "dtype": config.storage_dtype},
        "buckets": [{"key": b.name, "frames": b.frames, "height": b.height, "width": b.width,
                     "latent_shape": vae["latent_shapes"][b.name]} for b in table],
        "settings": {**settings, "decode_backend": config.decode_backend},
        "settings_hash": stable_hash(identity),
        "input": {"manifest": storage.redact(config.manifest), "records": records},
    }


def _differences(old: dict, new: dict) -> list[str]:
    out = [f"VAE {d}" for d in fingerprint_diff(old.get("vae") or {}, new["vae"])]
    out += [f"text encoder {d}" for d in fingerprint_diff(old.get("text_encoder") or {}, new["text_encoder"])]
    keys = lambda m: [b.get("key") for b in m.get("buckets") or []]  # noqa: E731
    if keys(old) != keys(new):
        out.append(f"buckets: {','.join(map(str, keys(old)))} != {','.join(keys(new))}")
    for name in SETTING_FIELDS:
        if (old.get("settings") or {}).get(name) != new["settings"][name]:
            out.append(f"{name}: {(old.get('settings') or {}).get(name)!r} != {new['settings'][name]!r}")
    return [d if len(d) < 300 else d[:297] + "..." for d in out]


def prepare_output(config: PrecomputeConfig, manifest: dict,
                   listing: tuple[list[str], list[str]] | None = None) -> list[str]:
    """Refuse an output made differently (unless overwrite), clear it if asked, write the provisional
    manifest. Returns the unit ids with a finished shard, from the run's one listing of the output
    (`listing`: list_output's result when the caller listed already)."""
    out, shown = config.output, storage.redact(config.output)
    if config.overwrite:
        for name in (SHARDS_DIR, ERRORS_DIR, INDEX_PARTS_DIR, MANIFEST_NAME, INDEX_NAME):
            storage.delete(storage.join(out, name))
        finished = []
    else:
        try:
            existing = read_output_manifest(out)
        except ShardError as err:
            raise PrecomputeError(f"{err}") from None
        if existing is not None:
            diffs = _differences(existing, manifest)
            if diffs:
                raise PrecomputeError(
                    f"{shown} was made with other encoders, buckets or settings:\n  " + "\n  ".join(diffs)
                    + "\nIts latents would not match this run's. Pass --overwrite (overwrite=True) to delete "
                    "them and start again, or choose another output folder.")
        finished, leftovers = listing or list_output(out)
        if existing is None and finished:
            raise PrecomputeError(f"{shown} holds shards but no {MANIFEST_NAME}, so nobody knows how they were made; "
                                  "pass --overwrite to delete them, or choose another output folder")
        for path in leftovers:  # left by a killed writer (local folders only); never a finished file
            Path(path).unlink(missing_ok=True)
    if not storage.is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    write_output_manifest(out, manifest)
    return finished


def decode_memory_bytes(config: PrecomputeConfig) -> int:
    """Memory one decode task reserves: its unit's uint8 clips three times (frames being converted,
    clips, the output block) plus 1 GiB for the process (torch, decoders, full-size source frames)."""
    largest = max(3 * b.frames * b.height * b.width for b in config.bucket_table())
    return 3 * largest * config.clips_per_video * config.rows_per_work_unit + (1 << 30)


def _run_pipeline(config: PrecomputeConfig, plan: Plan, vae_fp: dict, text_fp: dict) -> dict:
    """Stream the pending units through the stages; returns this run's counts."""
    import ray
    from tqdm import tqdm

    stats = {"units": 0, "videos": 0, "clips": 0, "failures": {}, "arrivals": [], "written": [], "nodes": set(),
             "decode_tasks": set()}
    if not plan.pending:
        return stats
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below counts units and clips; Ray's would interleave with it
    decode_compute = ray.data.TaskPoolStrategy(size=config.decode_concurrency) if config.decode_concurrency else None
    # The plan's files are read in the cluster: the driver never holds the units' rows.
    filesystem, _ = storage.resolve(config.output)  # credentials and endpoint from this environment
    # One unit per block: a block is decoded by one task from start to end, and the reader packs plan rows
    # into blocks by bytes (a unit's row is ~2 KB, so thousands of units a block). Without the split one
    # task would decode a block's units in series while the encoders wait, every later stage would get
    # them as one block, and the finished units would reach the writer all at once. The split streams:
    # the driver never holds the plan's rows or all their blocks.
    ds = ray.data.read_parquet([storage.resolve(f)[1] for f in plan.plan_files], filesystem=filesystem)
    ds = ds.repartition(target_num_rows_per_block=1)
    # A decode task reserves the memory its unit's clips take. Besides guarding against OOM, this keeps
    # Ray Data from fusing the decode tasks into the VAE actors (it fuses ops with equal resources):
    # fused, the VAE would sit idle during every decode.
    # Worker deaths (preemption, OOM kills): tasks run again, actors restart, both within the config's
    # limits; a unit is written only by the write task that finishes, atomically, so never twice.
    actor_limits = {"max_restarts": config.actor_restarts, "max_task_retries": config.actor_restarts}
    ds = ds.map_batches(decode_units, batch_size=1, batch_format="pyarrow", num_cpus=config.decode_num_cpus,
                        compute=decode_compute, memory=decode_memory_bytes(config), max_retries=config.task_retries,
                        fn_kwargs={"buckets": str(config.bucket_table()), "fps": config.fps,
                                   "clips_per_video": config.clips_per_video, "backend": config.decode_backend,
                                   "source": config.manifest, "decode_timeout": config.decode_timeout})
    # Two calls per actor: Ray Data prepares the next unit (input fetch, batching) while the model runs
    # on the current one; the model itself still runs one unit at a time.
    ds = ds.map_batches(VAEStage, batch_size=1, compute=ray.data.ActorPoolStrategy(
                            size=config.vae_concurrency, max_concurrent_calls_per_actor=2),
                        num_cpus=config.vae_num_cpus, num_gpus=config.num_gpus_per_actor, **actor_limits,
                        fn_constructor_kwargs={"kind": config.vae, "build_kwargs": config.vae_build_kwargs(),
                                               "fingerprint": vae_fp, "batch_size": config.vae_batch_size,
                                               "num_cpus": config.vae_num_cpus})
    ds = ds.map_batches(TextStage, batch_size=1, compute=ray.data.ActorPoolStrategy(
                            size=config.text_concurrency, max_concurrent_calls_per_actor=2),
                        num_cpus=config.text_num_cpus, num_gpus=config.text_gpus, **actor_limits,
                        fn_constructor_kwargs={"kind": config.text_encoder, "build_kwargs": config.text_build_kwargs(),
                                               "fingerprint": text_fp, "batch_size": config.text_batch_size,
                                               "num_cpus": config.text_num_cpus})
    ds = ds.map_batches(write_units, batch_size=1, num_cpus=config.write_num_cpus, max_retries=config.task_retries,
                        fn_kwargs={"output": config.output, "storage_dtype": config.storage_dtype,
                                   "bucket_keys": [b.name for b in config.bucket_table()]})
    interactive = sys.stderr.isatty()  # in a Ray job's log, redraw every 30 s rather than 10 times a second
    appender = IndexAppender(config.output)
    with tqdm(total=plan.pending, unit="unit", desc="precompute", disable=not config.progress, dynamic_ncols=True,
              mininterval=0.1 if interactive else 30.0) as bar:
        # Whole blocks of finished units, as Arrow tables: the driver appends them to the index and sums
        # their counts column-wise, with no Python work per unit.
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            appender.add(batch)
            stats["written"] += batch.column("unit_id").to_pylist()
            stats["nodes"].update(batch.column("decode_node").to_pylist() + batch.column("write_node").to_pylist())
            stats["decode_tasks"].update(batch.column("decode_task").to_pylist())
            clips = int(pc.sum(batch.column("rows")).as_py() or 0)
            stats["units"] += batch.num_rows
            stats["videos"] += int(pc.sum(batch.column("videos")).as_py() or 0)
            stats["clips"] += clips
            # For the steady-state rate: when each unit was written (by its write task), not when the
            # driver got it: Ray Data may hand over several units' blocks at once.
            stats["arrivals"] += zip(batch.column("written_at").to_pylist(), batch.column("rows").to_pylist())
            flat = pc.list_flatten(batch.column("failures"))
            for reason, n in zip(pc.struct_field(flat, "reason").to_pylist(),
                                 pc.struct_field(flat, "count").to_pylist()):
                stats["failures"][reason] = stats["failures"].get(reason, 0) + n
            bar.update(batch.num_rows)
            bar.set_postfix(clips=stats["clips"], failed=sum(stats["failures"].values()))
    appender.flush()
    return stats


def unit_settings_hash(config: PrecomputeConfig) -> str:
    """The settings a work unit's id depends on (known before any encoder is loaded; an output made
    with other encoders is refused, so the encoders need not be part of the ids)."""
    return stable_hash({"buckets": str(config.bucket_table()),
                        **{name: getattr(config, name) for name in SETTING_FIELDS}})


def plan_precompute(config: PrecomputeConfig, *, write: bool) -> tuple[Plan, tuple[list[str], list[str]]]:
    """One listing of the output, then the plan (see pipeline/data/source/plan.py); written into
    the output folder with `write`. A bad manifest fails here, before Ray starts."""
    listing = ([], []) if config.overwrite else list_output(config.output)
    plan = plan_run(config.manifest, rows_per_unit=config.rows_per_work_unit, settings_hash=unit_settings_hash(config),
                    finished=listing[0], write_to=config.output if write else None,
                    video_column=config.video_column, caption_column=config.caption_column,
                    start_column=config.start_column, end_column=config.end_column)
    return plan, listing


def format_plan(config: PrecomputeConfig, plan: Plan, seconds: float) -> str:
    return "\n".join([
        f"precompute plan: {storage.redact(config.manifest)} -> {storage.redact(config.output)}",
        f"  videos in         {plan.records}",
        f"  work units        {plan.units}  ({config.rows_per_work_unit} rows each)",
        f"  already done      {plan.finished}" + ("  (--overwrite: none kept)" if config.overwrite else ""),
        f"  to do             {plan.pending}  ({plan.pending_rows} videos)",
        f"  planned in        {seconds:.1f} s (nothing decoded; encoders and settings are checked by the run)",
    ])


def run_precompute(config: PrecomputeConfig) -> dict:
    """Run (or resume) a precomputation; prints and returns the summary (see `format_summary`).
    With `config.plan_only`: plans, prints and returns the counts, and starts nothing."""
    start = time.time()
    preflight(config)
    if config.plan_only:
        plan, _ = plan_precompute(config, write=False)
        print(format_plan(config, plan, time.time() - start), flush=True)
        return {"status": "planned", "output": storage.redact(config.output), "videos_in": plan.records,
                "work_units": plan.units, "work_units_skipped": plan.finished, "work_units_pending": plan.pending,
                "videos_pending": plan.pending_rows, "total_seconds": round(time.time() - start, 3)}
    import ray

    started_ray = _init_ray(config)
    plan_dir = storage.join(config.output, PLAN_DIR)
    try:
        check_output_is_shared(config, ray.nodes())  # before anything is written
        plan, listing = plan_precompute(config, write=True)
        if not started_ray:  # a cluster we joined
            warn_if_cluster_too_small(config, ray.cluster_resources().get("CPU", 0))
        need, have = max(config.num_gpus_per_actor, config.text_gpus), ray.cluster_resources().get("GPU", 0)
        if need and have < need:  # an autoscaling cluster may add GPU nodes; a fixed one never will
            print(f"precompute: warning: encoder actors need {need:g} GPU each and the cluster has {have:g} now; "
                  "waiting for GPUs (use --num-gpus-per-actor 0 to encode on CPUs)", file=sys.stderr, flush=True)
        vae, text = describe_encoders(config)
        manifest = build_output_manifest(config, vae, text, plan.records)
        try:
            finished = prepare_output(config, manifest, listing)
        except PrecomputeError:
            storage.delete(plan_dir)  # the refused run's own plan
            raise
        write_text_conditioning(config.output, from_bytes(text.pop("conditioning"), source="the text encoder"))
        pipeline_start = time.time()
        stats = _run_pipeline(config, plan, vae["fingerprint"], text["fingerprint"])
        seconds = time.time() - pipeline_start
        # Units written now are known from the pipeline's own rows: no second listing of the output.
        final = finish_manifest(config.output, manifest, plan.unit_ids, finished=finished + stats["written"])
        storage.delete(plan_dir)
    finally:
        if started_ray:
            ray.shutdown()
    totals = final["totals"]
    summary = {
        "output": storage.redact(config.output),
        "status": final["status"],
        "videos_in": plan.records,
        "work_units": plan.units,
        "work_units_skipped": plan.finished,
        "work_units_written": stats["units"],
        "videos_this_run": stats["videos"],
        "clips_this_run": stats["clips"],
        "failures_this_run": stats["failures"],
        "clips_out": totals["clips"],
        "failed_videos": totals["failed_videos"],
        "long_captions": totals["long_captions"],
        "long_caption_examples": totals["long_caption_examples"],
        "text_max_length": text["max_length"],
        "failures_by_reason": totals["failures_by_reason"],
        "nodes": sorted(n for n in stats["nodes"] if n),  # Ray nodes that decoded or wrote units this run
        "decode_tasks": len({t for t in stats["decode_tasks"] if t}),  # one per unit when units stream singly
        "pipeline_seconds": round(seconds, 3),
        "total_seconds": round(time.time() - start, 3),
        "clips_per_second": round(stats["clips"] / seconds, 3) if stats["clips"] else 0.0,
        "steady_clips_per_second": round(steady_rate(stats["arrivals"]), 3),
    }
    print(format_summary(summary), flush=True)
    return summary


def steady_rate(arrivals: list[tuple[float, int]]) -> float:
    """Clips per second between the first and the last finished unit: the rate once every actor has
    loaded its model (start-up excluded). 0.0 (unknown) with fewer than 4 units or under a second
    between them: units arrive in bursts, so fewer say nothing."""
    arrivals = sorted(arrivals)
    if len(arrivals) < 4 or arrivals[-1][0] - arrivals[0][0] < 1.0:
        return 0.0
    return sum(n for _, n in arrivals[1:]) / (arrivals[-1][0] - arrivals[0][0])


def format_summary(summary: dict) -> str:
    failures = ", ".join(f"{k}: {v}" for k, v in sorted(summary["failures_by_reason"].items())) or "none"
    lines = [
        f"precompute {summary['status']}: {summary['output']}",
        f"  videos in         {summary['videos_in']}  ({summary['work_units']} work units: "
        f"{summary['work_units_skipped']} already done, {summary['work_units_written']} written now)",
        f"  clips out         {summary['clips_out']}  ({summary['clips_this_run']} this run)",
        f"  failed videos     {summary['failed_videos']}  ({failures}; details in {ERRORS_DIR}/*/*.jsonl)",
        f"  captions cut      {summary['long_captions']}  (clips whose caption has more than the text encoder's "
        f"{summary['text_max_length']} tokens)" + "".join(f"\n                    e.g. {c[:100]!r}"
                                                         for c in summary["long_caption_examples"][:3]),
        f"  Ray nodes         {len(summary['nodes'])}  (decoded or wrote work units this run, in "
        f"{summary['decode_tasks']} decode tasks)",
        f"  clips per second  {summary['clips_per_second']:.2f}  ({summary['clips_this_run']} clips in "
        f"{summary['pipeline_seconds']:.1f} s; {summary['total_seconds']:.1f} s with start-up; "
        + (f"{summary['steady_clips_per_second']:.2f} once running)" if summary["steady_clips_per_second"]
           else "too few work units for a steady rate)"),
    ]
    if summary["status"] != "complete":
        lines.append("  some work units have no shard (a worker died?): run the same command again to finish")
    return "\n".join(lines)
