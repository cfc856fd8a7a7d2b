"""`train.checkpoint_mirror`: complete checkpoints copied to object storage, and resumed from there.

    <mirror>/step_00000300/...        the checkpoint's files, same layout as <output_dir>/checkpoints
    <mirror>/step_00000300/.uploaded/rank_00001    rank 1 uploaded all its files of this step
    <mirror>/step_00000300/COMPLETE   uploaded by rank 0 last, once every rank's marker is there
    <mirror>/latest                   "step_00000300", after COMPLETE
    <mirror>/conditioning.safetensors (+ .json)   rank 0's text conditioning, restored on a fresh node

Uploads: after a checkpoint is complete locally, each rank uploads the files it wrote (DeepSpeed's
zero_pp_rank_R_* and rng/rank_R.json are rank R's, the rest rank 0's) in a background thread, so
training goes on while the bytes travel. Rank 0's thread then waits for every rank's marker in the
mirror (the store is the meeting point: no collective runs outside the training thread), uploads
COMPLETE and `latest`, and applies `train.keep_checkpoints` to the mirror. Training waits only (a) at
the next checkpoint, for the previous upload of its own rank, so at most one upload is in flight and
local retention never deletes files being uploaded, and (b) at the end of the run, until the last
checkpoint is complete in the mirror. An upload error stops the run at that wait, on every rank.

Resume (`--resume auto`): rank 0 lists the mirror once and picks the newest complete checkpoint there
or in its own folder (the local one on a tie: no download); with node-local folders only mirrored
checkpoints count, since other nodes cannot read rank 0's disk. The lowest rank on each folder
downloads that checkpoint whole into its folder when the folder does not hold it complete.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.train import checkpoint as ckpt
from pipeline.train.conditioning import FILE_NAME as COND_FILE

log = logging.getLogger("pomvid.train")
UPLOADED = ".uploaded"
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_|(?:^|/)rank_(\d+)\.json$")
_STEP = re.compile(r"^step_(\d{8})/")
POLL_S = 0.5  # how often rank 0 looks for the other ranks' upload markers
# Files of <output_dir> (rank 0's) that a resume needs besides the checkpoint: the text conditioning.
RUN_FILES = (COND_FILE, str(Path(COND_FILE).with_suffix(".json")))


def file_owner(relative: str) -> int:
    """The rank that wrote checkpoint file `relative` (DeepSpeed names per-rank files by the data-parallel
    rank, which is the global rank here: DeepSpeed's group is the whole world)."""
    match = _RANK_FILE.search(relative)
    return int(match.group(1) or match.group(2)) if match else 0


def mirrored_checkpoints(listing: dict[str, int]) -> dict[int, dict[str, int]]:
    """{step: {relative path: size}} of the complete checkpoints in a listing of the mirror's root."""
    steps: dict[int, dict[str, int]] = {}
    for path, size in listing.items():
        match = _STEP.match(path)
        if match:
            steps.setdefault(int(match.group(1)), {})[path[match.end():]] = size
    return {step: files for step, files in steps.items() if ckpt.COMPLETE in files}


class CheckpointMirror:
    """One per rank. `upload(folder, step)` after each complete local checkpoint; `wait()` before the next
    one and at the end (every rank, together: it ends with a collective)."""

    def __init__(self, uri: str, *, rank: int, world_size: int, keep: int, device: torch.device):
        self.uri, self.rank, self.world_size, self.keep, self.device = uri.rstrip("/"), rank, world_size, keep, device
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def upload(self, folder: Path, step: int) -> None:
        self._thread = threading.Thread(target=self._upload, args=(Path(folder), step), daemon=True,
                                        name=f"mirror-step-{step}")
        self._thread.start()

    def wait(self) -> None:
        """Wait for this rank's upload; raise on every rank if any rank's failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failed = torch.tensor([1 if self._error else 0], dtype=torch.int32, device=self.device)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(failed)
        if int(failed.item()):
            error, self._error = self._error, None
            raise RuntimeError(f"mirroring checkpoints to {storage.redact(self.uri)} failed"
                               + (f" on rank {self.rank}: {error}" if error else " on another rank (see its log)"))

    # -- the upload thread ---------------------------------------------------------------------------

    def _upload(self, folder: Path, step: int) -> None:
        target = storage.join(self.uri, folder.name)
        try:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                relative = path.relative_to(folder).as_posix()
                if relative == ckpt.COMPLETE or relative.startswith(ckpt.UNIVERSAL + "/"):
                    continue
                if file_owner(relative) == self.rank:
                    storage.put_file(path, storage.join(target, relative))
            if self.rank == 0:  # the null caption must not change when fresh nodes resume (conditioning.py)
                for name in RUN_FILES:
                    if (folder.parent.parent / name).is_file():
                        storage.put_file(folder.parent.parent / name, storage.join(self.uri, name))
            storage.put_bytes(b"ok\n", storage.join(target, UPLOADED, f"rank_{self.rank:05d}"))
            if self.rank == 0:
                self._complete(target, folder, step)
        except Exception as err:  # reported by wait(), on the training thread
            self._error = f"step {step}: {err}"
            if self.rank == 0:
                return
            try:  # tell rank 0, which waits for this rank's marker
                storage.put_bytes(str(err).encode(), storage.join(target, UPLOADED, f"rank_{self.rank:05d}.failed"))
            except storage.StorageError:
                pass

    def _complete(self, target: str, folder: Path, step: int) -> None:
        while True:
            markers = storage.list_files(storage.join(target, UPLOADED))
            failed = sorted(name for name in markers if name.endswith(".failed"))
            if failed:
                raise storage.StorageError(f"{', '.join(failed)} in {storage.redact(target)}/{UPLOADED}")
            if len(markers) == self.world_size:
                break
            time.sleep(POLL_S)
        storage.put_file(folder / ckpt.COMPLETE, storage.join(target, ckpt.COMPLETE))
        storage.put_bytes(f"{folder.name}\n".encode(), storage.join(self.uri, ckpt.LATEST))
        log.info("checkpoint step %d mirrored to %s", step, storage.redact(target))
        self._prune()

    def _prune(self) -> None:
        """train.keep_checkpoints on the mirror: COMPLETE goes first, so a half-deleted one never looks complete."""
        listing = storage.list_files(self.uri)
        complete = sorted(mirrored_checkpoints(listing))
        doomed = complete[:-self.keep] if self.keep and len(complete) > self.keep else []
        newest = complete[-1] if complete else None
        started = {int(m.group(1)) for m in map(_STEP.match, listing) if m}
        doomed += [s for s in started if newest is not None and s < newest and s not in complete]
        for step in sorted(doomed):
            name = ckpt.step_dir(Path(), step).name
            storage.delete(storage.join(self.uri, name, ckpt.COMPLETE))
            storage.delete(storage.join(self.uri, name))


def prune_local_copies(root: Path, keep: int) -> None:
    """On a node-local folder of a rank other than 0 (never complete there): keep the newest `keep` step folders."""
    steps = sorted(p for p in Path(root).glob("step_*") if p.is_dir())
    for path in steps[:-keep] if keep else []:
        shutil.rmtree(path, ignore_errors=True)


# -- resume ------------------------------------------------------------------------------------------

_NO_CHECKPOINT, _REFUSED = -1, -2


def resolve_mirrored_resume(uri: str, ckpt_root: Path, *, resume: str, local: Path | None, shared: bool,
                            owner: bool, rank: int, device: torch.device) -> Path | None:
    """The checkpoint folder to resume from for --resume none|auto with a mirror (every rank calls this;
    rank 0 decides, each folder's owner downloads what its folder lacks). `local`: resolve_resume's
    choice in rank 0's own folder."""
    message = ""
    decision = torch.tensor([_NO_CHECKPOINT], dtype=torch.int64, device=device)
    if rank == 0:
        try:
            step, message = _decide(uri, resume=resume, local=local, shared=shared)
        except storage.StorageError as err:  # refused on every rank, not only here
            step, message = _REFUSED, str(err)
        decision.fill_(step)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(decision, 0)
    step = int(decision.item())
    if step == _REFUSED:
        raise ConfigError(message or "rank 0 refused to resume (its error says why)")
    folder = None if step == _NO_CHECKPOINT else ckpt.step_dir(ckpt_root, step)
    if folder is not None and owner and not ckpt.is_complete(folder):
        _download(uri, folder)
    if folder is not None and rank == 0:  # rank 0 alone reads the conditioning
        for name in RUN_FILES:
            local_file = Path(ckpt_root).parent / name
            if not local_file.is_file() and storage.exists(storage.join(uri, name)):
                storage.get_file(storage.join(uri, name), local_file)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return folder


def _decide(uri: str, *, resume: str, local: Path | None, shared: bool) -> tuple[int, str]:
    mirrored = mirrored_checkpoints(storage.list_files(uri))  # the one listing of the mirror
    newest = max(mirrored) if mirrored else None
    shown = storage.redact(uri)
    if resume == "none":
        if newest is not None:
            return _REFUSED, (f"train.checkpoint_mirror={shown} already holds checkpoints (newest: step {newest}); "
                              "pass --resume auto to continue that run, or another mirror prefix for a new one")
        return _NO_CHECKPOINT, ""
    local_step = int(local.name[len("step_"):]) if local is not None else None
    if shared and local_step is not None and (newest is None or local_step >= newest):
        return local_step, ""
    if not shared and local_step is not None and (newest is None or local_step > newest):
        if newest is None:
            return _REFUSED, (f"rank 0's folder holds the checkpoint {local} but {shown} holds no complete one, and "
                              "the other nodes cannot read rank 0's disk: check train.checkpoint_mirror, or start a "
                              "new run in another --output-dir")
        log.warning("resuming from the mirrored step %d: the newer %s was not mirrored completely", newest, local)
    if newest is not None:
        log.info("resuming from the mirrored checkpoint step %d in %s", newest, shown)
        return newest, ""
    return _NO_CHECKPOINT, ""


def _download(uri: str, folder: Path) -> None:
    """The mirrored checkpoint of `folder`'s step, whole, into `folder`; COMPLETE last, then `latest`."""
    source = storage.join(uri, folder.name)
    files = storage.list_files(source)
    if folder.exists():  # an interrupted download or save: never mix old and new files
        shutil.rmtree(folder)
    for relative in sorted(files):
        if relative != ckpt.COMPLETE and not relative.startswith(UPLOADED + "/"):
            storage.get_file(storage.join(source, relative), folder / relative)
    storage.get_file(storage.join(source, ckpt.COMPLETE), folder / ckpt.COMPLETE)
    ckpt.write_atomic(folder.parent / ckpt.LATEST, folder.name + "\n")
