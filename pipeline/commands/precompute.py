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
    from pipeline.data.precompute_config import PrecomputeConfig, field_docs

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
    from pipeline.data.precompute_config import PrecomputeConfig

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
    from pipeline.data.manifest import ManifestError
    from pipeline.data.precompute import PrecomputeError, run_precompute

    try:
        config = config_from_args(args)
        summary = run_precompute(config)
    except (ValueError, ManifestError, PrecomputeError, FileNotFoundError) as err:
        print(f"pomvid precompute: {err}", file=sys.stderr)
        return 2
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["status"] == "complete" else 1
