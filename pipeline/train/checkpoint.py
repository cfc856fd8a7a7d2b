"""Checkpoints: DeepSpeed's own files plus our state, complete before they become `latest`.

    <output_dir>/checkpoints/
        step_00000300/
            deepspeed/               engine.save_checkpoint: weights, ZeRO optimizer shards, LR scheduler
            ema.safetensors          the full fp32 EMA (gathered from the ZeRO-3 shards when sharded)
            trainer_state.json       step, loader state, counters, MLflow run id, world layout, config
            rng/rank_00000.json      per-rank RNG states (torch CPU/CUDA as hex bytes, numpy, python)
            universal/               made on demand: DeepSpeed's universal checkpoint (resume on another dp)
            COMPLETE                 written last, after every rank finished writing
        latest                       "step_00000300", replaced atomically after COMPLETE

A checkpoint without COMPLETE (a run killed mid-save) is never loaded, and a save at the same step
first removes it. `find_latest` prefers the newest complete checkpoint. Our own files are JSON and
safetensors (no pickle); DeepSpeed's folder is DeepSpeed's format, written and read by DeepSpeed.

Resuming with another world size (data-parallel size): DeepSpeed's ZeRO checkpoints are partitioned
per rank, so rank 0 converts the folder once into DeepSpeed's universal format
(deepspeed.checkpoint.ds_to_universal) and every rank loads that with `load_universal` (verified
exact on CPU for ZeRO 1, 2 and 3: tests/integration/test_train_resume.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import storage

COMPLETE = "COMPLETE"
LATEST = "latest"
DS_TAG = "deepspeed"
UNIVERSAL = "universal"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Fault injection for the tests: "STEP:SECONDS" sleeps inside the save of STEP before COMPLETE exists.
FAULT_DELAY_ENV = "POMVID_FAULT_CHECKPOINT_DELAY"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsync and rename: readers see old or new."""
    storage.put_bytes(text.encode(), Path(path))


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint: the `latest` pointer when it names a complete one and none is newer
    (a crash between COMPLETE and the pointer update leaves a newer complete one), else None."""
    complete = complete_checkpoints(root)
    newest = complete[-1][1] if complete else None
    pointer = Path(root) / LATEST
    if pointer.is_file():
        named = Path(root) / pointer.read_text().strip()
        if is_complete(named) and (newest is None or named.name >= newest.name):
            return named
    return newest


def read_state(path: Path) -> dict:
    """trainer_state.json of a checkpoint folder, with clear errors."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} file): it was interrupted "
                                "while saving; resume from another one (--resume auto picks the newest complete)")
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path / STATE_FILE}: version {state.get('version')!r}, this code reads {STATE_VERSION}")
    return state


# -- RNG states ---------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states as JSON-compatible values."""
    numpy_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *[float(v) if isinstance(v, float) else int(v)
                                                              for v in numpy_state[2:]]],
        "torch": torch.get_rng_state().numpy().tobytes().hex(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.frombuffer(bytearray.fromhex(state["torch"]), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray.fromhex(s), dtype=torch.uint8) for s in state["cuda"]])


# -- save / load --------------------------------------------------------------------------------------


def _fault_delay(step: int) -> None:
    spec = os.environ.get(FAULT_DELAY_ENV, "")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


def save(engine, root: Path, step: int, *, ema_state: dict | None, trainer_state: dict, rank: int,
         barrier, owner: bool | None = None) -> Path:
    """Save a checkpoint of `step` (every rank calls this); returns its folder once it is complete.

    ema_state: the full EMA tensors (already gathered, needed on rank 0 only). barrier(): a barrier
    over all ranks. owner: this rank clears the folder of an interrupted save (default: rank 0; with
    node-local output folders the lowest rank of each folder, pipeline/train/shared_folder.py).
    """
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )
    from safetensors.torch import save_file

    root = Path(root)
    folder = step_dir(root, step)
    if (rank == 0) if owner is None else owner:
        if folder.exists():  # left by a save that was interrupted: never mix old and new files
            shutil.rmtree(folder)
    barrier()
    (folder / "rng").mkdir(parents=True, exist_ok=True)  # every rank makes the folders it writes into
    # The universal-checkpoint marker lets ds_to_universal convert this folder for another dp size.
    client = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(folder), tag=DS_TAG, client_state=client, save_latest=False)
    (folder / "rng" / f"rank_{rank:05d}.json").write_text(json.dumps(rng_state()))
    if rank == 0:
        if ema_state is not None:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, str(folder / EMA_FILE))
        (folder / STATE_FILE).write_text(json.dumps({**trainer_state, "version": STATE_VERSION, "step": step},
                                                    indent=1))
    _fault_delay(step)
    barrier()  # every rank's files are written
    if rank == 0:
        write_atomic(folder / COMPLETE, f"step {step} saved {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        write_atomic(root / LATEST, folder.name + "\n")
    barrier()
    return folder


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (0: keep all) and incomplete folders older
    than the newest complete one. Rank 0 only. Returns the removed folders."""
    complete = complete_checkpoints(root)
    removed = []
    if keep and len(complete) > keep:
        for _, path in complete[:-keep]:
            (path / COMPLETE).unlink()  # first: a half-deleted folder must never look complete
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if complete:
        newest = complete[-1][1].name
        for child in Path(root).iterdir():
            if _STEP_DIR.match(child.name) and child.name < newest and not is_complete(child):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def ensure_universal(folder: Path, *, rank: int, barrier, owner: bool | None = None) -> Path:
    """Convert `folder`'s DeepSpeed checkpoint to the universal format once (rank 0, or the `owner` of each
    node-local folder); returns the universal root to give `engine.load_checkpoint(root, tag=DS_TAG)`
    with load_universal enabled."""
    out = Path(folder) / UNIVERSAL
    if ((rank == 0) if owner is None else owner) and not is_complete(out):
        import argparse

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(out, ignore_errors=True)
        # One worker each: serial, in this process (the converter's pools would fork a DeepSpeed rank).
        ds_to_universal(argparse.Namespace(
            input_folder=str(Path(folder) / DS_TAG), output_folder=str(out / DS_TAG), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        write_atomic(out / COMPLETE, "converted\n")
    barrier()
    return out


def load_ema(folder: Path) -> dict | None:
    from safetensors.torch import load_file

    path = Path(folder) / EMA_FILE
    return load_file(str(path)) if path.is_file() else None


def load_rng(folder: Path, rank: int) -> dict | None:
    path = Path(folder) / "rng" / f"rank_{rank:05d}.json"
    return json.loads(path.read_text()) if path.is_file() else None
