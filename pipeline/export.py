"""A trained model as one folder: the EMA weights, the model config and the encoders' fingerprints.

    pomvid export runs/S --out exports/S-step3000          # the run's newest complete checkpoint
    generator = VideoGenerator.load("exports/S-step3000")   # sampling reads export folders too

An export folder holds
    model.safetensors       the EMA weights (fp32), the tensors `PoMDiT(DiTConfig(**config["model"]))` takes
    config.json             {"format": "pomvid-export", "version", "model": DiTConfig fields, "step",
                             "source": {checkpoint, mlflow_run_id, run_folder}}
    latents_manifest.json   the latents' manifest without its shard list: VAE and text-encoder
                            fingerprints (how to rebuild both), latent channels and scaling, buckets, fps

Nothing else is needed to sample: no DeepSpeed files, no optimizer state, no latents. The files are
JSON and safetensors (no pickle). `write_export` writes into a temporary sibling folder and renames it,
so a folder that exists is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

EXPORT_FORMAT = "pomvid-export"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "latents_manifest.json"
# The manifest's per-shard list can hold thousands of entries and says nothing about how to sample.
_MANIFEST_DROP = ("shards",)


class ExportError(ValueError):
    """An export that cannot be written or read; the message names the file and the fix."""


@dataclass(kw_only=True)
class Export:
    """What an export folder holds, read back."""

    folder: Path
    """The export folder."""
    model: dict
    """DiTConfig fields."""
    weights: dict
    """name -> tensor: the EMA weights."""
    manifest: dict
    """The latents' manifest (encoders' fingerprints, latent scaling, buckets, settings)."""
    step: int
    """Training step of the checkpoint it was exported from."""
    source: dict
    """Provenance: checkpoint folder, MLflow run id, run folder."""


def is_export(path: str | os.PathLike) -> bool:
    """True when `path` is an export folder (its config.json says format pomvid-export)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == EXPORT_FORMAT
    except (ValueError, AttributeError):
        return False


def write_export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Export the EMA weights of `checkpoint` (a run folder, checkpoints/ or one step folder) to `out`."""
    from safetensors.torch import save_file

    from pipeline.generate import SampleError, find_manifest, resolve_checkpoint
    from pipeline.train import checkpoint as ckpt

    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"export folder {out} already exists; pass --overwrite to replace it or pick another --out")
    try:
        folder = resolve_checkpoint(checkpoint)
        state = ckpt.read_state(folder)
        manifest, _ = find_manifest(folder, state)
    except SampleError as err:
        raise ExportError(str(err)) from None
    model = (state.get("config") or {}).get("model")
    if not isinstance(model, dict):
        raise ExportError(f"{folder / ckpt.STATE_FILE} holds no model config; was it written by `pomvid train`?")
    ema = ckpt.load_ema(folder)
    if ema is None:
        raise ExportError(f"checkpoint {folder} has no {ckpt.EMA_FILE} (the EMA weights an export holds); "
                          "export another checkpoint of the run")
    config = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": model, "step": int(state["step"]),
              "source": {"checkpoint": str(folder.resolve()), "mlflow_run_id": state.get("mlflow_run_id"),
                         "run_folder": str(folder.resolve().parent.parent)}}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / WEIGHTS_FILE),
              metadata={"format": EXPORT_FORMAT, "step": str(config["step"])})
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    kept = {k: v for k, v in manifest.items() if k not in _MANIFEST_DROP}
    (tmp / MANIFEST_FILE).write_text(json.dumps(kept, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_export(path: str | os.PathLike) -> Export:
    """Read an export folder; ExportError names the missing or broken file."""
    from safetensors.torch import load_file

    folder = Path(path)
    files = {name: folder / name for name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE)}
    missing = [name for name, p in files.items() if not p.is_file()]
    if missing:
        raise ExportError(f"export {folder}: missing {', '.join(missing)}; export the checkpoint again "
                          "(pomvid export RUN --out DIR)")
    try:
        config = json.loads(files[CONFIG_FILE].read_text())
        manifest = json.loads(files[MANIFEST_FILE].read_text())
    except ValueError as err:
        raise ExportError(f"export {folder}: a JSON file is not valid ({err}); export the checkpoint again") from None
    if config.get("format") != EXPORT_FORMAT or config.get("version") != EXPORT_VERSION:
        raise ExportError(f"{files[CONFIG_FILE]}: format {config.get('format')!r} version {config.get('version')!r}; "
                          f"this code reads {EXPORT_FORMAT!r} version {EXPORT_VERSION}")
    try:
        weights = load_file(str(files[WEIGHTS_FILE]))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ExportError(f"{files[WEIGHTS_FILE]}: not a readable safetensors file ({err})") from None
    return Export(folder=folder, model=config["model"], weights=weights, manifest=manifest,
                  step=int(config.get("step", 0)), source=config.get("source") or {})
