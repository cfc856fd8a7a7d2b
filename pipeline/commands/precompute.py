"""`pomvid precompute`: decode videos, VAE- and text-encode them with Ray Data, write latent shards.

    pomvid precompute --manifest videos.csv --out latents/ --vae cogvideox --vae-path WEIGHTS \\
        --text-encoder t5 --text-encoder-path T5 --buckets 17x256x256,17x256x448 --num-gpus-per-actor 1

Runs on a local Ray (started for the run) or on the cluster in $RAY_ADDRESS / --ray-address. The same
command again resumes; see docs/precompute.md. jobs/precompute_latents.py takes the same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

# Flags whose name is not just the field's name with dashes.
_FLAG_NAMES = {"output": "--out"}
_JSON_FIELDS = ("vae_config", "text_encoder_config")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per PrecomputeConfig field (help = the field's docstring), plus --summary-json."""
    from pipeline.data.precompute.config import PrecomputeConfig, field_docs

    docs = field_docs()
    for field in dataclasses.fields(PrecomputeConfig):
        flag = _FLAG_NAMES.get(field.name, "--" + field.name.replace("_", "-"))
        help_text = docs.get(field.name, "")
        required = field.default is dataclasses.MISSING
        if field.type in ("bool", bool):
            if field.default:  # --no-progress
                parser.add_argument("--no-" + field.name.replace("_", "-"), dest=field.name,
                                    action="store_false", help=help_text + " (on by default)")
            else:
                parser.add_argument(flag, dest=field.name, action="store_true", help=help_text)
            continue
        kind = str(field.type)
        convert = int if kind.startswith("int") else float if kind.startswith("float") else str
        if field.name in _JSON_FIELDS:
            help_text += " (JSON text, or @file.json)"
        parser.add_argument(flag, dest=field.name, type=convert, required=required,
                            default=None if required else field.default, help=help_text)
    parser.add_argument("--summary-json", help="also write the summary to this JSON file")
    from pipeline.tracking.cliargs import add_tracking_args

    add_tracking_args(parser)


def _json_arg(value: str | None, flag: str):
    if value is None:
        return None
    try:
        if value.startswith("@"):
            with open(value[1:]) as f:
                return json.load(f)
        return json.loads(value)
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag}: not JSON text or a readable @file.json ({err})") from None


def config_from_args(args: argparse.Namespace):
    """PrecomputeConfig from parsed flags (ValueError naming the field on bad values)."""
    from pipeline.data.precompute.config import PrecomputeConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PrecomputeConfig)}
    for name in _JSON_FIELDS:
        values[name] = _json_arg(values[name], "--" + name.replace("_", "-"))
    return PrecomputeConfig(**values)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "precompute",
        help="precompute VAE latents and text embeddings of a video manifest with Ray Data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from pipeline.data.precompute.run import PrecomputeError, run_precompute
    from pipeline.data.source.manifest import ManifestError
    from pipeline.storage import StorageError
    from pipeline.tracking import TrackingError

    try:
        config = config_from_args(args)
        if config.plan_only:  # counts only: no MLflow run, nothing written to the output
            summary = run_precompute(config)
            if args.summary_json:
                with open(args.summary_json, "w") as f:
                    json.dump(summary, f, indent=2)
            return 0
        tracker = _start_tracking(args, config)
    except (ValueError, ManifestError, TrackingError, PrecomputeError) as err:
        print(f"pomvid precompute: {err}", file=sys.stderr)
        return 2
    status = "FAILED"
    try:
        summary = run_precompute(config)
        _log_summary(tracker, config, summary)
        status = "FINISHED" if summary["status"] == "complete" else "FAILED"
    except (ValueError, ManifestError, PrecomputeError, FileNotFoundError, StorageError) as err:
        print(f"pomvid precompute: {err}", file=sys.stderr)
        return 2
    finally:
        tracker.end(status)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["status"] == "complete" else 1


def _start_tracking(args, config):
    """An MLflow run of kind `precompute` (a no-op tracker with --tracking off or on rank != 0)."""
    import os
    import time

    from pipeline.tracking import start_run
    from pipeline.tracking.cliargs import tracking_kwargs

    kwargs = tracking_kwargs(args)
    kwargs["run_name"] = kwargs["run_name"] or f"precompute-{time.strftime('%Y%m%d-%H%M%S')}"
    kwargs.pop("upload_checkpoints")
    from pipeline import storage

    logged = dataclasses.asdict(config)  # URIs without user:password@ (secrets never reach MLflow)
    logged.update(manifest=storage.redact(config.manifest), output=storage.redact(config.output))
    output_dir = None if storage.is_remote(config.output) else config.output
    if output_dir is None and kwargs["enabled"] and not (kwargs["tracking_uri"] or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ValueError(f"--out {storage.redact(config.output)} is on object storage, which cannot hold the "
                         "embedded MLflow store: pass --tracking-uri (or set MLFLOW_TRACKING_URI) or --tracking off")
    return start_run(config={"precompute": logged}, output_dir=output_dir,
                     tags={"pomvid.kind": "precompute"}, **kwargs)


def _log_summary(tracker, config, summary: dict) -> None:
    import tempfile
    from pathlib import Path

    from pipeline import storage

    counts = {k: summary[k] for k in ("videos_in", "clips_out", "failed_videos", "long_captions", "work_units",
                                      "work_units_written", "work_units_skipped", "clips_this_run")}
    tracker.log_precompute_summary(
        counts=counts, elapsed_s=summary["total_seconds"], failures_by_reason=summary["failures_by_reason"],
        throughput={"clips_per_second": summary["clips_per_second"],
                    "steady_clips_per_second": summary["steady_clips_per_second"]},
        extra={"status": summary["status"], "output": summary["output"]},
    )
    # Copied into the run's spool: a later precompute of the same folder rewrites both before a
    # `pomvid runs sync` after an outage would send them.
    if storage.is_remote(config.output):  # the errors stay in the bucket; their counts are logged above
        with tempfile.TemporaryDirectory(prefix="pomvid-precompute-") as folder:
            local = storage.get_file(storage.join(config.output, "manifest.json"), Path(folder) / "manifest.json")
            tracker.log_artifact(local, snapshot=True)
        return
    errors = Path(config.output) / "errors"
    if errors.is_dir() and any(errors.iterdir()):
        tracker.log_artifact(errors, "errors", snapshot=True)  # every failed video with its reason
    tracker.log_artifact(Path(config.output) / "manifest.json", snapshot=True)
