"""pipeline/train/mirror.py without a launcher: which rank owns which checkpoint file, the upload protocol
(files, per-rank markers, COMPLETE and `latest` last, retention) and the resume decision, on a mirror
in a local folder (file://; the S3 path runs in tests/integration/test_launch_no_ssh.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.train import checkpoint as ckpt
from pipeline.train.mirror import CheckpointMirror, file_owner, mirrored_checkpoints, resolve_mirrored_resume

CPU = torch.device("cpu")


def _fake_checkpoint(root: Path, step: int) -> Path:
    folder = ckpt.step_dir(root, step)
    for name, text in {"deepspeed/mp_rank_00_model_states.pt": "model", "trainer_state.json": "{}",
                       "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt": f"optim {step}",
                       "rng/rank_00000.json": "{}", "universal/deepspeed/x": "made on demand"}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    ckpt.write_atomic(folder / ckpt.COMPLETE, "done\n")
    return folder


def test_file_owner():
    assert file_owner("deepspeed/zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert file_owner("deepspeed/bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert file_owner("deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt") == 1  # ZeRO-3: per rank
    assert file_owner("rng/rank_00007.json") == 7
    assert file_owner("deepspeed/mp_rank_00_model_states.pt") == 0  # ZeRO 1/2: rank 0 writes the weights
    assert file_owner("ema.safetensors") == file_owner("trainer_state.json") == 0


def test_mirrored_checkpoints_only_complete():
    listing = {"step_00000003/COMPLETE": 5, "step_00000003/ema.safetensors": 9, "step_00000006/ema.safetensors": 9,
               "latest": 14}
    assert mirrored_checkpoints(listing) == {3: {"COMPLETE": 5, "ema.safetensors": 9}}


def test_upload_then_resume_on_an_empty_folder(tmp_path):
    mirror_uri = f"file://{tmp_path / 'mirror'}"
    root = tmp_path / "node" / "checkpoints"
    mirror = CheckpointMirror(mirror_uri, rank=0, world_size=1, keep=2, device=CPU)
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "conditioning.safetensors").write_bytes(b"null caption")  # rank 0's run files
    (tmp_path / "node" / "conditioning.json").write_text("{}")
    for step in (3, 6, 9):
        mirror.wait()  # as the trainer does before each save
        mirror.upload(_fake_checkpoint(root, step), step)
    mirror.wait()
    listing = storage.list_files(mirror_uri)
    assert sorted(mirrored_checkpoints(listing)) == [6, 9]  # keep=2 applies to the mirror
    assert storage.read_bytes(storage.join(mirror_uri, "latest")) == b"step_00000009\n"
    assert "step_00000009/.uploaded/rank_00000" in listing
    assert not any("universal/" in key for key in listing)  # made on demand, never mirrored

    # A fresh node: nothing local. auto restores step 9 from the mirror, whole, COMPLETE included.
    fresh = tmp_path / "fresh" / "checkpoints"
    folder = resolve_mirrored_resume(mirror_uri, fresh, resume="auto", local=None, shared=False, owner=True, rank=0,
                                     device=CPU)
    assert folder == ckpt.step_dir(fresh, 9) and ckpt.find_latest(fresh) == folder
    assert (folder / "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt").read_text() == "optim 9"
    assert not (folder / ".uploaded").exists()
    assert (tmp_path / "fresh" / "conditioning.safetensors").read_bytes() == b"null caption"  # the same null caption
    assert (tmp_path / "fresh" / "conditioning.json").read_text() == "{}"

    # A shared folder that holds a newer complete checkpoint than the mirror uses its own (no download).
    local = _fake_checkpoint(tmp_path / "shared" / "checkpoints", 12)
    got = resolve_mirrored_resume(mirror_uri, local.parent, resume="auto", local=local, shared=True, owner=True,
                                  rank=0, device=CPU)
    assert got == local
    # Node-local folders: only what is mirrored counts (other nodes cannot read rank 0's disk).
    got = resolve_mirrored_resume(mirror_uri, local.parent, resume="auto", local=local, shared=False, owner=True,
                                  rank=0, device=CPU)
    assert got == ckpt.step_dir(local.parent, 9) and ckpt.is_complete(got)
    # --resume none refuses a mirror that already holds checkpoints.
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(newest: step 9\); pass --resume auto"):
        resolve_mirrored_resume(mirror_uri, fresh, resume="none", local=None, shared=True, owner=True, rank=0,
                                device=CPU)


def test_failed_upload_stops_at_the_wait(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the mirror's folder should be")
    mirror = CheckpointMirror(f"file://{blocker}", rank=0, world_size=1, keep=0, device=CPU)
    mirror.upload(_fake_checkpoint(tmp_path / "checkpoints", 3), 3)
    with pytest.raises(RuntimeError, match=r"mirroring checkpoints to file://.*not-a-folder failed on rank 0: step 3"):
        mirror.wait()
