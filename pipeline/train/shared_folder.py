"""Does every rank see the same output folder? Checked once at train start, before any checkpoint.

Checkpoints are written by every rank into <output_dir>/checkpoints and completed by rank 0, so ranks on
nodes without a shared disk would each write into a folder of their own and rank 0 would mark a
checkpoint complete that holds only its node's files. The check: every rank writes a marker
(`.pomvid_ranks/<nonce>/rank_XXXXX.json`: host, rank, folder) into the output folder; after a barrier
each rank lists the markers it sees. The lowest rank that sees a folder's markers owns that folder (it
creates and clears the folders there, pipeline/train/checkpoint.py). When some rank does not see all
markers, the run stops with an error naming the hosts, unless `train.checkpoint_mirror` is set: then
node-local folders are allowed and complete checkpoints live in the mirror (pipeline/train/mirror.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import ConfigError

MARKERS = ".pomvid_ranks"
LISTING_PATIENCE_S = 5.0  # how long a rank waits for markers it does not see yet
_NAME_BYTES = 1024  # host and folder of a rank travel as fixed-size byte tensors


@dataclass(frozen=True, kw_only=True)
class FolderSharing:
    shared: bool
    """Every rank sees every other rank's marker: one folder for all."""
    owner: bool
    """This rank is the lowest rank that sees its folder: it creates and clears folders there."""
    hosts: tuple[str, ...] = ()
    """Host name of each rank (index = rank)."""


def _gather_text(text: str, world: int, device: torch.device) -> list[str]:
    """`text` of every rank (index = rank), through one all_gather of fixed-size byte tensors."""
    data = text.encode()[:_NAME_BYTES]
    mine = torch.zeros(_NAME_BYTES + 1, dtype=torch.int32)
    mine[0] = len(data)
    mine[1:1 + len(data)] = torch.tensor(list(data), dtype=torch.int32)
    mine = mine.to(device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    return [bytes(t[1:1 + int(t[0])].tolist()).decode(errors="replace") for t in (e.cpu() for e in every)]


def _broadcast_nonce(device: torch.device) -> str:
    nonce = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(device)
    dist.broadcast(nonce, 0)
    return f"{int(nonce.item()):x}"


def check_output_folder(output_dir: str | os.PathLike, *, rank: int, world_size: int, device: torch.device,
                        mirror: str = "") -> FolderSharing:
    """Every rank calls this after the process group exists (`device`: where its collectives' tensors live,
    the GPU under NCCL); raises ConfigError on every rank when the ranks see different folders and no
    `mirror` is set."""
    host = socket.gethostname()
    if world_size == 1 or not dist.is_initialized():
        return FolderSharing(shared=True, owner=True, hosts=(host,))
    folder = Path(output_dir).expanduser().resolve()
    markers = folder / MARKERS / _broadcast_nonce(device)
    markers.mkdir(parents=True, exist_ok=True)
    (markers / f"rank_{rank:05d}.json").write_text(json.dumps({"host": host, "rank": rank, "folder": str(folder)}))
    places = [json.loads(t) for t in _gather_text(json.dumps([host, str(folder)]), world_size, device)]  # also a barrier
    seen = _visible_ranks(markers, world_size)
    sees_all = torch.tensor([1 if len(seen) == world_size else 0], dtype=torch.int32, device=device)
    dist.all_reduce(sees_all)  # every rank has listed once this returns
    shared = int(sees_all.item()) == world_size
    owner = bool(seen) and seen[0] == rank
    dist.barrier()  # all listings done before an owner removes the markers
    if owner:
        shutil.rmtree(markers.parent, ignore_errors=True)
    dist.barrier()  # no rank goes on while markers are still there
    if not shared and not mirror:
        raise ConfigError(_not_shared_message(places, rank0_sees=_gather_seen(seen, rank, device)))
    return FolderSharing(shared=shared, owner=owner, hosts=tuple(h for h, _ in places))


def _visible_ranks(markers: Path, world_size: int) -> list[int]:
    """Ranks whose markers this rank sees. A network file system may show another client's new files only
    after its attribute cache expires: an incomplete listing is retried for a few seconds."""
    deadline = time.monotonic() + LISTING_PATIENCE_S
    while True:
        seen = sorted(int(p.name[5:10]) for p in markers.glob("rank_*.json"))
        if len(seen) == world_size or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def _gather_seen(seen: list[int], rank: int, device: torch.device) -> list[int]:
    """Rank 0's list of visible ranks, on every rank (so every rank can word the same error)."""
    count = torch.tensor([len(seen) if rank == 0 else 0], dtype=torch.int64, device=device)
    dist.broadcast(count, 0)
    ranks = torch.tensor(seen if rank == 0 else [0] * int(count.item()), dtype=torch.int64, device=device)
    dist.broadcast(ranks, 0)
    return ranks.cpu().tolist()


def _not_shared_message(places: list[list[str]], *, rank0_sees: list[int]) -> str:
    def who(ranks):
        return ", ".join(f"rank {r} on host {places[r][0]} ({places[r][1]})" for r in ranks)

    missing = [r for r in range(len(places)) if r not in rank0_sees]
    return (
        f"train.output_dir is not one folder shared by all nodes: rank 0 on host {places[0][0]} sees the markers of "
        f"{who(rank0_sees)} in {places[0][1]}, but not those of {who(missing)}. Checkpoints need either an output "
        "folder on a file system every node mounts (NFS, Lustre, a shared PersistentVolume), or "
        "--set train.checkpoint_mirror=s3://BUCKET/PREFIX: then each node keeps its own folder and complete "
        "checkpoints are mirrored to object storage, where --resume auto finds them"
    )
