"""The stages of the precompute pipeline, one Ray Data row per work unit all the way through.

A work unit (a few consecutive manifest rows) travels as one row: {"unit_id", "meta" (JSON: clips,
errors, videos), "video" (flat uint8 pixels: 4x fewer object-store bytes than float32; the VAE actor
makes them float) | "latent" + "text" (flat float32), clips concatenated in shard-row order}.
Keeping the unit whole means the VAE and the text encoder see batches made from one unit only, so a unit's numbers do not depend on which other units shared an actor call: a resumed run
reproduces an uninterrupted one bit for bit (same hardware), and the writer needs no regrouping.

decode_units (CPU tasks) -> VAEStage (actors) -> TextStage (actors) -> write_units (tasks).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time

import numpy as np

from pipeline import storage
from pipeline.data.source.manifest import VideoRecord, normalize_video_path
from pipeline.data.store.shards import (
    ShardRow,
    errors_path,
    relative_shard_file,
    shard_path,
    shard_table,
    write_jsonl_atomic,
    write_shard,
)

LONG_CAPTION_EXAMPLES = 3  # long captions named per unit (the summary names the first few of the run)


def stable_hash(obj, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:length]


def _flat(arrays: list[np.ndarray], dtype=np.float32) -> np.ndarray:
    return np.concatenate([a.reshape(-1) for a in arrays]).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


def _objects(items: list) -> np.ndarray:
    # A 1-D object array of per-row arrays (np.array would try to stack equal shapes).
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def within(seconds: float, what: str, fn):
    """fn() in a daemon thread: its result or its exception, or DecodeError("timeout") after `seconds`.

    A decoder blocked in C (a pipe whose writer hangs, a network file system that stopped answering)
    cannot be interrupted from Python: its thread is abandoned, blocked, and the task goes on with
    the next video. Daemon, so it never holds up the worker's exit."""
    from pipeline.data.decode.container import DecodeError

    box: dict = {}
    done = threading.Event()

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller as it is
            box["error"] = err
        finally:
            done.set()

    threading.Thread(target=target, daemon=True, name="pomvid-decode").start()
    if not done.wait(seconds):
        raise DecodeError("timeout", f"{what}: probing and decoding took longer than {seconds:g} s "
                                     "(--decode-timeout); skipped")
    if "error" in box:
        raise box["error"]
    return box["value"]


def decode_units(batch, *, buckets: str, fps: float, clips_per_video: int, backend: str,
                 source: str = "", decode_timeout: float = 120.0) -> dict:
    """Probe, plan and decode every video of each unit; failures become error entries, never exceptions.

    `batch`: units as the plan stores them (pipeline/data/source/plan.py PLAN_SCHEMA), a pyarrow table.
    A video that takes longer than `decode_timeout` seconds is recorded with reason "timeout"."""
    from pipeline.data.decode.buckets import parse_buckets
    from pipeline.data.decode.container import DecodeError
    from pipeline.data.decode.video import decode_clips, open_video, plan_clips
    from pipeline.data.source.plan import unit_video_id

    table = parse_buckets(buckets)
    order = {b.name: i for i, b in enumerate(table)}
    out = {"unit_id": [], "meta": [], "video": []}
    for unit_id, videos in zip(batch.column("unit_id").to_pylist(), batch.column("videos").to_pylist()):
        clips, errors, arrays = [], [], []
        for row_in_unit, fields in enumerate(videos):
            video_id = unit_video_id(unit_id, row_in_unit)
            record = VideoRecord(path=normalize_video_path(fields["path"]), caption=fields["caption"],
                                 start=fields["start"], end=fields["end"], source_row=fields["source_row"],
                                 source=source)
            def decode(record=record):
                if not storage.is_remote(record.path):
                    return decode_file(record, record.path)
                # decord and PyAV read files: fetch the object (inside the timeout: a stalled download
                # counts as a hung decode), decode, and delete it whatever happens.
                with tempfile.TemporaryDirectory(prefix="pomvid-video-") as folder:
                    local = os.path.join(folder, "video" + os.path.splitext(record.path)[1])
                    try:
                        storage.get_file(record.path, local)
                    except storage.StorageError as err:
                        raise DecodeError("missing" if "no such file" in str(err) else "unreadable", str(err)) from None
                    return decode_file(record, local)

            def decode_file(record, path):
                # One pass over the file: probed by the reader that then decodes it (open_video).
                with open_video(path, backend=backend) as video:
                    info = video.info  # size as shown (rotation applied): a phone video is portrait
                    plans = plan_clips(record, info, table, fps, clips_per_video)
                    bucket = plans[0].bucket  # one video, one bucket; its clips share one decoding pass
                    return plans, decode_clips(path, starts=[p.start for p in plans], frames=bucket.frames,
                                               height=bucket.height, width=bucket.width, fps=fps, backend=backend,
                                               uint8=True, rotation=info.rotation, video=video)  # (3, T, H, W) uint8

            try:
                plans, decoded = within(decode_timeout, record.path, decode)
            except DecodeError as err:
                errors.append({"id": video_id, "path": record.path, "source_row": record.source_row,
                               "reason": err.reason, "message": err.message})
                continue
            except Exception as err:  # a decoder bug must not kill the job: record it like bad input
                errors.append({"id": video_id, "path": record.path, "source_row": record.source_row,
                               "reason": "decode_error", "message": f"{type(err).__name__}: {err}"})
                continue
            for plan, array in zip(plans, decoded):
                clips.append({
                    "id": stable_hash([video_id, round(plan.start, 6), plan.bucket.name]),
                    "caption": record.caption, "source_path": record.path, "source_row": record.source_row,
                    "clip_start": plan.start, "clip_end": plan.end, "fps": fps, "bucket": plan.bucket.name,
                    "shape": list(array.shape), "_sort": (order[plan.bucket.name], row_in_unit, plan.index),
                })
                arrays.append(array)
        # Shard rows go by bucket (table order), then manifest row, then clip: the loader relies on it.
        ranked = sorted(range(len(clips)), key=lambda i: clips[i].pop("_sort"))
        meta = {"videos": len(videos), "clips": [clips[i] for i in ranked], "errors": errors,
                "decode_node": node_id(), "decode_task": task_id()}
        out["unit_id"].append(unit_id)
        out["meta"].append(json.dumps(meta))
        out["video"].append(_flat([arrays[i] for i in ranked], np.uint8))
    return {"unit_id": np.array(out["unit_id"]), "meta": np.array(out["meta"]), "video": _objects(out["video"])}


def node_id() -> str:
    """The Ray node this task runs on ("" outside Ray): the summary counts the nodes that did the work."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def task_id() -> str:
    """The Ray task running this ("" outside Ray): the summary counts the decode tasks, one per unit
    when the units stream through the stages one by one."""
    import ray

    return (ray.get_runtime_context().get_task_id() or "") if ray.is_initialized() else ""


def _set_threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def _check_fingerprint(what: str, expected: dict, actual: dict) -> None:
    from pipeline.data.encode.fingerprint import fingerprint_diff

    diff = fingerprint_diff(expected, actual)
    if diff:
        raise RuntimeError(f"{what} on this worker differs from the one the run was started with "
                           f"({'; '.join(diff)}): every node must see the same weights")


class VAEStage:
    """Ray actor: loads the VAE once, encodes each unit's clips in batches of one shape."""

    def __init__(self, *, kind: str, build_kwargs: dict, fingerprint: dict, batch_size: int, num_cpus: float):
        from pipeline.data.encode.vae_factory import build_vae

        _set_threads(num_cpus)
        self.vae = build_vae(kind, **build_kwargs)
        _check_fingerprint(f"{kind} VAE", fingerprint, self.vae.fingerprint())
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        metas, latents_out = [], []
        for meta_json, video in zip(batch["meta"], batch["video"]):
            meta = json.loads(meta_json)
            metas.append(meta)
            latents_out.append(self._encode_unit(meta["clips"], video))
        return {"unit_id": batch["unit_id"], "meta": np.array([json.dumps(m) for m in metas]),
                "latent": _objects(latents_out)}

    def _encode_unit(self, clips: list[dict], video: np.ndarray) -> np.ndarray:
        """All clips of one unit; sets each clip's latent_shape; returns the latents flat (float32)."""
        import warnings

        import torch

        from pipeline.data.decode.frames import uint8_to_model_range

        if not clips:
            return np.zeros(0, np.float32)
        with warnings.catch_warnings():  # Ray hands out read-only arrays; nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(video)
        if self.vae.device.type == "cuda":
            # The whole unit to the GPU in one asynchronous copy (uint8: a quarter of float32's bytes),
            # and the latents back in one: the GPU runs the unit's batches back to back.
            flat = flat.pin_memory().to(self.vae.device, non_blocking=True)
        flat = uint8_to_model_range(flat)  # (N,) float32 in [-1, 1], on the VAE's device
        latents, offset, i = [], 0, 0
        while i < len(clips):
            # Consecutive clips of one shape (rows are sorted by bucket) are contiguous in `video`.
            shape = clips[i]["shape"]
            n = 1
            while n < self.batch_size and i + n < len(clips) and clips[i + n]["shape"] == shape:
                n += 1
            size = int(np.prod(shape))
            z = self.vae.encode(flat[offset:offset + n * size].view(n, *shape))  # (n, C, T', H', W')
            for k in range(n):
                clips[i + k]["latent_shape"] = list(z.shape[1:])
            latents.append(z.reshape(-1))
            offset, i = offset + n * size, i + n
        return torch.cat(latents).float().cpu().numpy()


class TextStage:
    """Ray actor: loads the text encoder once, encodes each unit's distinct captions."""

    def __init__(self, *, kind: str, build_kwargs: dict, fingerprint: dict, batch_size: int, num_cpus: float):
        from pipeline.data.encode.text_factory import build_text_encoder

        _set_threads(num_cpus)
        self.encoder = build_text_encoder(kind, **build_kwargs)
        _check_fingerprint(f"{kind} text encoder", fingerprint, self.encoder.fingerprint())
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        metas, texts = [], []
        for meta_json in batch["meta"]:
            meta = json.loads(meta_json)
            captions = list(dict.fromkeys(c["caption"] for c in meta["clips"]))  # distinct, in order
            valid: dict[str, np.ndarray] = {}
            for first in range(0, len(captions), self.batch_size):
                chunk = captions[first:first + self.batch_size]
                emb, mask = self.encoder.encode(chunk)  # (B, L, D), (B, L)
                emb, mask = emb.float().cpu().numpy(), mask.cpu().numpy()
                for caption, e, m in zip(chunk, emb, mask):
                    length = int(m.sum())
                    if not m[:length].all():
                        raise RuntimeError(f"text encoder mask for {caption!r} is not a prefix; "
                                           "shards store the first `length` tokens only")
                    valid[caption] = e[:length]  # (length, D)
            long = {c for c, n in zip(captions, self.encoder.token_counts(captions)) if n > self.encoder.max_length}
            for clip in meta["clips"]:
                clip["text_length"] = int(valid[clip["caption"]].shape[0])
            # Cut to max_length by the encoder: counted per clip, and the first few named in the index.
            meta["long_captions"] = sum(c["caption"] in long for c in meta["clips"])
            meta["long_caption_examples"] = [c for c in captions if c in long][:LONG_CAPTION_EXAMPLES]
            meta["text_dim"] = int(self.encoder.dim)
            metas.append(json.dumps(meta))
            texts.append(_flat([valid[c["caption"]] for c in meta["clips"]]).astype(np.float32, copy=False))
        return {"unit_id": batch["unit_id"], "meta": np.array(metas), "latent": batch["latent"],
                "text": _objects(texts)}


def write_units(batch: dict, *, output: str, storage_dtype: str, bucket_keys: list[str]):
    """Write each unit's errors file, then its shard (the shard's existence marks the unit done);
    returns the units' index rows (pipeline/data/store/index.py INDEX_SCHEMA) plus written_at."""
    import pyarrow as pa

    from pipeline.data.store.index import INDEX_SCHEMA, index_table

    cols: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    decoded_on: dict[str, list] = {"decode_node": [], "decode_task": []}
    for unit_id, meta_json, latent, text in zip(batch["unit_id"], batch["meta"], batch["latent"], batch["text"]):
        meta = json.loads(meta_json)
        for name, values in decoded_on.items():
            values.append(meta.get(name, ""))
        rows, lat_off, txt_off = [], 0, 0
        dim = meta.get("text_dim", 0)
        for clip in meta["clips"]:
            shape = clip["latent_shape"]
            n_lat, n_txt = int(np.prod(shape)), clip["text_length"] * dim
            rows.append(ShardRow(
                id=clip["id"], caption=clip["caption"], latent=latent[lat_off:lat_off + n_lat].reshape(shape),
                text=text[txt_off:txt_off + n_txt].reshape(clip["text_length"], dim),
                source_path=clip["source_path"], source_row=clip["source_row"], clip_start=clip["clip_start"],
                clip_end=clip["clip_end"], fps=clip["fps"], bucket=clip["bucket"],
            ))
            lat_off, txt_off = lat_off + n_lat, txt_off + n_txt
        failures: dict[str, int] = {}
        for e in meta["errors"]:
            failures[e["reason"]] = failures.get(e["reason"], 0) + 1
        buckets: dict[str, int] = {}
        for r in rows:
            buckets[r.bucket] = buckets.get(r.bucket, 0) + 1
        if meta["errors"]:
            write_jsonl_atomic(errors_path(output, unit_id), [{"unit_id": unit_id, **e} for e in meta["errors"]])
        else:  # a file fixed since an interrupted attempt must not stay listed as failed
            storage.delete(errors_path(output, unit_id))
        shard_meta = {"unit_id": unit_id, "videos": meta["videos"], "buckets": buckets, "failures": failures,
                      "long_captions": meta.get("long_captions", 0),
                      "long_caption_examples": meta.get("long_caption_examples", [])}
        write_shard(shard_path(output, unit_id), shard_table(rows, storage_dtype=storage_dtype, metadata=shard_meta))
        cols["file"].append(relative_shard_file(unit_id))
        cols["unit_id"].append(str(unit_id))
        cols["rows"].append(len(rows))
        cols["videos"].append(meta["videos"])
        cols["clips_per_bucket"].append([buckets.get(k, 0) for k in bucket_keys])
        cols["failures"].append([{"reason": r, "count": n} for r, n in sorted(failures.items())])
        cols["long_captions"].append(shard_meta["long_captions"])
        cols["long_caption_examples"].append(shard_meta["long_caption_examples"])
    table = index_table(cols)
    table = table.append_column("written_at", pa.array([time.time()] * table.num_rows, pa.float64()))
    # Where each unit was decoded and written (not stored in the index: the summary reports the nodes
    # and counts the decode tasks).
    for name, values in decoded_on.items():
        table = table.append_column(name, pa.array(values, pa.string()))
    return table.append_column("write_node", pa.array([node_id()] * table.num_rows, pa.string()))
