"""The shared-folder check with 2 real processes (gloo on 127.0.0.1), both outcomes: one folder for both
ranks passes (rank 0 owns it); two folders stop both ranks with the error naming hosts and folders,
unless a checkpoint mirror is set (then each rank owns its own folder)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import ConfigError
from pipeline.train import shared_folder
from tests.deepspeed_launch import free_port


def _rank(rank: int, port: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    shared_folder.LISTING_PATIENCE_S = 0.2  # the folders here are local: no cache to wait for
    cpu, results = torch.device("cpu"), {}
    cases = {"shared": (f"{root}/run", ""), "separate": (f"{root}/node{rank}/run", ""),
             "mirrored": (f"{root}/m{rank}/run", "s3://bucket/runs/x")}
    for name, (folder, mirror) in cases.items():
        try:
            got = shared_folder.check_output_folder(folder, rank=rank, world_size=2, device=cpu, mirror=mirror)
            results[name] = {"shared": got.shared, "owner": got.owner, "hosts": list(got.hosts),
                             "markers_left": (Path(folder) / shared_folder.MARKERS).exists()}
        except ConfigError as err:
            results[name] = {"error": str(err)}
    Path(root, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_shared_folder_check_both_outcomes(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    host = socket.gethostname()
    for rank, got in enumerate(ranks):
        assert got["shared"] == {"shared": True, "owner": rank == 0, "hosts": [host, host], "markers_left": False}
        assert got["mirrored"] == {"shared": False, "owner": True, "hosts": [host, host], "markers_left": False}
        error = got["separate"]["error"]  # every rank stops with the same words
        assert error.startswith("train.output_dir is not one folder shared by all nodes: rank 0 on host "), error
        assert f"but not those of rank 1 on host {host} ({tmp_path}/node1/run)" in error
        assert "--set train.checkpoint_mirror=s3://BUCKET/PREFIX" in error
