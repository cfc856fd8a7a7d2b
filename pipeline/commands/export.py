"""`pomvid export`: a checkpoint's EMA weights as one folder that sampling and plain Python load.

    pomvid export runs/S --out exports/S                       # newest complete checkpoint of the run
    pomvid export runs/S/checkpoints/step_00003000 --out exports/S-3000 --register pomvid-S

Writes model.safetensors (EMA weights), config.json (model config, step, source run) and
latents_manifest.json (the VAE and text encoder to rebuild, latent scaling, buckets, fps); see
pipeline/export.py. `pomvid sample --checkpoint exports/S` and `pomvid eval --checkpoint exports/S`
take the folder. --register NAME also logs the folder as an artifact of the training run and registers
it as a new version of model NAME in MLflow's model registry, tagged with the run's eval metrics.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="EMA weights + configs as one folder; optionally register it",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run folder, its checkpoints/ folder or one step folder")
    parser.add_argument("--out", required=True, help="export folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    parser.add_argument("--register", default=None, metavar="NAME",
                        help="log the export to the training run and register it as a version of model NAME")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store for --register (default: MLFLOW_TRACKING_URI, else the run's mlflow.db)")
    parser.add_argument("--experiment", default="pomvid",
                        help="experiment of the run made when the checkpoint names none (default: pomvid)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.export import ExportError, read_export, write_export

    try:
        folder = write_export(args.checkpoint, args.out, overwrite=args.overwrite)
        export = read_export(folder)
    except ExportError as err:
        print(f"pomvid export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported step {export.step} of {export.source.get('checkpoint')} to {folder}")
    print(f"  sample it: pomvid sample --checkpoint {folder} --prompt \"...\" --out samples/")
    if args.register:
        from pipeline.eval.registry import register_export
        from pipeline.tracking.uri import TrackingError

        try:
            version = register_export(export, args.register, tracking_uri=args.tracking_uri,
                                      experiment=args.experiment)
        except TrackingError as err:
            print(f"pomvid export: error: {err} (the export in {folder} is complete)", file=sys.stderr)
            return 1
        print(f"  registered as model {args.register!r} version {version['version']} at {version['tracking_uri']} "
              f"(run {version['run_id']}, artifacts {version['artifact_path']})")
        for key, value in sorted(version["tags"].items()):
            if key.startswith("eval/"):
                print(f"    {key} = {value}")
    return 0
