"""LatentDataset / LatentLoader: bucketed batches, determinism, DP/SP assignment, exact resume."""

from __future__ import annotations

import json
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.load.loader import LatentDataset, LatentLoader
from pipeline.data.store.shards import ShardError
from tests.latent_store import CHANNELS, TEXT_DIM, latent_shape, make_latent_output

A, B = "5x16x16", "9x16x32"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """3 shards, 40 clips: 26 in bucket A, 14 in bucket B, text lengths 0..6."""
    root = tmp_path_factory.mktemp("latents")
    shards = [[(A if i % 3 else B, i % 7) for i in range(start, start + size)] for start, size in ((0, 15), (15, 11), (26, 14))]
    make_latent_output(root, shards, buckets=[A, B])
    return root


def ids_of(batches):
    return [i for b in batches for i in b["ids"]]


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_dataset_index_and_samples(store):
    ds = LatentDataset(store)
    assert len(ds) == 40
    assert {k: len(v) for k, v in ds.bucket_indices().items()} == {A: 26, B: 14}
    for i in range(len(ds)):
        s = ds[i]
        n = int(s["id"].split("-")[1])
        assert s["bucket"] == (A if n % 3 else B)
        assert s["latent"].shape == latent_shape(s["bucket"]) and s["latent"].dtype == torch.float32
        assert torch.all(s["latent"] == n)
        assert s["text"].shape == (n % 7, TEXT_DIM)
        assert s["caption"] == f"caption {n}"


def test_collate_pads_text_with_mask(store):
    ds = LatentDataset(store)
    idx = ds.bucket_indices()[A][:4]
    batch = ds.collate([ds[i] for i in idx])
    lengths = [int(i.split("-")[1]) % 7 for i in batch["ids"]]
    assert batch["latents"].shape == (4, CHANNELS, *latent_shape(A)[1:])
    assert batch["text"].shape == (4, max(1, max(lengths)), TEXT_DIM)
    assert batch["text_mask"].dtype == torch.bool
    assert batch["text_mask"].sum(1).tolist() == lengths
    assert torch.all(batch["text"][~batch["text_mask"]] == 0)


def test_every_batch_one_bucket_each_sample_at_most_once(store):
    loader = LatentLoader(LatentDataset(store), batch_size=4, dp_rank=0, dp_size=1, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 26 // 4 + 14 // 4
    for b in batches:
        n = [int(i.split("-")[1]) for i in b["ids"]]
        assert len({(x % 3 == 0) for x in n}) == 1 and b["bucket"] == (B if n[0] % 3 == 0 else A)
    seen = ids_of(batches)
    assert len(seen) == len(set(seen)) == 4 * len(batches)
    assert loader.epoch == 1


def test_drop_last_false_covers_every_sample(store):
    loader = LatentLoader(LatentDataset(store), batch_size=4, dp_rank=0, dp_size=1, seed=0, drop_last=False)
    assert set(ids_of(list(loader))) == {f"clip-{n}" for n in range(40)}


def test_deterministic_per_seed_and_epoch(store):
    ds = LatentDataset(store)
    make = lambda seed: LatentLoader(ds, batch_size=3, dp_rank=0, dp_size=1, seed=seed)  # noqa: E731
    one, two, other = make(7), make(7), make(8)
    e0 = ids_of(list(one))
    assert e0 == ids_of(list(two))
    assert e0 != ids_of(list(other))
    e1 = ids_of(list(one))  # the next epoch is shuffled differently
    assert e1 != e0 and one.epoch == 2
    one.set_epoch(0)
    assert ids_of(list(one)) == e0


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_ranks_split_every_global_batch(store, dp_size):
    ds = LatentDataset(store)
    ref = list(LatentLoader(ds, batch_size=8, dp_rank=0, dp_size=1, seed=3))
    per_rank = [list(LatentLoader(ds, batch_size=8 // dp_size, dp_rank=r, dp_size=dp_size, seed=3)) for r in range(dp_size)]
    assert all(len(p) == len(ref) for p in per_rank)
    for step, glob in enumerate(ref):
        parts = [p[step]["ids"] for p in per_rank]
        assert all(len(x) == 8 // dp_size for x in parts)
        assert [i for x in parts for i in x] == glob["ids"]  # disjoint, in rank order, same bucket
        assert {p[step]["bucket"] for p in per_rank} == {glob["bucket"]}


def test_sp_ranks_of_one_group_get_the_same_samples(store):
    # SP ranks 0 and 1 of DP group 1 (dp_size 2) both build the loader from (dp_rank=1, dp_size=2).
    ds = LatentDataset(store)
    sp0 = list(LatentLoader(ds, batch_size=2, dp_rank=1, dp_size=2, seed=5))
    sp1 = list(LatentLoader(LatentDataset(store), batch_size=2, dp_rank=1, dp_size=2, seed=5))
    other_dp = list(LatentLoader(ds, batch_size=2, dp_rank=0, dp_size=2, seed=5))
    for a, b, c in zip(sp0, sp1, other_dp):
        assert a["ids"] == b["ids"] and torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])
        assert not set(a["ids"]) & set(c["ids"])


@pytest.mark.parametrize("new_dp", [1, 2, 4])
def test_resume_counts_samples_also_after_dp_change(store, new_dp):
    ds = LatentDataset(store)
    g = 4
    # Uninterrupted: two epochs at dp 1.
    full = LatentLoader(ds, batch_size=g, dp_rank=0, dp_size=1, seed=11)
    reference = [list(full), list(full)]
    # Interrupted at dp 2 after 3 batches of epoch 1 (epoch 0 complete), resumed at new_dp.
    old = [LatentLoader(ds, batch_size=g // 2, dp_rank=r, dp_size=2, seed=11) for r in range(2)]
    for loader in old:
        list(loader)
        take(loader, 3)
    state = old[0].state_dict()
    assert state == old[1].state_dict()
    assert state["epoch"] == 1 and state["samples_consumed"] == 3 * g
    state = json.loads(json.dumps(state))  # it goes through a checkpoint file
    new = [LatentLoader(ds, batch_size=g // new_dp, dp_rank=r, dp_size=new_dp, seed=11) for r in range(new_dp)]
    for loader in new:
        loader.load_state_dict(state)
    rest = [list(loader) for loader in new]
    assert len(rest[0]) == len(reference[1]) - 3
    for step, glob in enumerate(reference[1][3:]):
        assert [i for r in range(new_dp) for i in rest[r][step]["ids"]] == glob["ids"]
    # After the epoch, the resumed loaders continue exactly like the uninterrupted one.
    assert [i for r in range(new_dp) for i in list(new[r])[0]["ids"]] == list(full)[0]["ids"]


def test_state_at_epoch_end_points_to_next_epoch(store):
    loader = LatentLoader(LatentDataset(store), batch_size=4, dp_rank=0, dp_size=1, seed=0)
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["samples_consumed"] == 0


def test_load_state_refuses_other_global_batch_seed_or_dataset(store, tmp_path):
    ds = LatentDataset(store)
    state = LatentLoader(ds, batch_size=4, dp_rank=0, dp_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="global batch 8.*batch_size = 8 // dp_size"):
        LatentLoader(ds, batch_size=4, dp_rank=0, dp_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        LatentLoader(ds, batch_size=4, dp_rank=0, dp_size=2, seed=2).load_state_dict(state)
    make_latent_output(tmp_path, [[(A, 1)] * 8])
    other = LatentDataset(tmp_path)
    with pytest.raises(ValueError, match="dataset"):
        LatentLoader(other, batch_size=4, dp_rank=0, dp_size=2, seed=1).load_state_dict(state)


def test_bad_arguments_and_outputs_fail_clearly(store, tmp_path):
    ds = LatentDataset(store)
    with pytest.raises(ValueError, match="dp_rank=2, dp_size=2"):
        LatentLoader(ds, batch_size=1, dp_rank=2, dp_size=2, seed=0)
    with pytest.raises(ValueError, match="no bucket holds a full global batch of 64"):
        LatentLoader(ds, batch_size=32, dp_rank=0, dp_size=2, seed=0)
    with pytest.raises(ShardError, match="no manifest.json"):
        LatentDataset(tmp_path)
    make_latent_output(tmp_path, [[(A, 1)] * 2, [(A, 1)]])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    with pytest.raises(ShardError, match="did not finish; run the same precompute command again"):
        LatentDataset(tmp_path)
    manifest["buckets"] = [{"key": B}, {"key": A}]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    index = pq.read_table(tmp_path / "index.parquet")
    pq.write_table(index.set_column(4, "clips_per_bucket", pa.array([[1, 1], [0, 1]], pa.list_(pa.int64()))),
                   tmp_path / "index.parquet")
    with pytest.raises(ShardError, match="modified after precompute"):
        LatentDataset(tmp_path)[0]
    pq.write_table(index.set_column(4, "clips_per_bucket", pa.array([[2, 1], [0, 1]], pa.list_(pa.int64()))),
                   tmp_path / "index.parquet")
    with pytest.raises(ShardError, match="do not match its 2 rows"):
        LatentDataset(tmp_path)


def test_prefetch_gives_the_same_batches_and_state_counts_only_what_was_consumed(store):
    sync = LatentLoader(LatentDataset(store), batch_size=3, dp_rank=1, dp_size=2, seed=5, prefetch=0)
    ahead = LatentLoader(LatentDataset(store), batch_size=3, dp_rank=1, dp_size=2, seed=5, prefetch=4, threads=3)
    want, got = list(sync), list(ahead)
    assert ids_of(got) == ids_of(want) and len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])
        assert torch.equal(a["text_mask"], b["text_mask"]) and a["bucket"] == b["bucket"]
    # Stopped after 2 batches while 4 more were read ahead: the state says 2, and a resume goes on from there.
    early = LatentLoader(LatentDataset(store), batch_size=3, dp_rank=1, dp_size=2, seed=5, prefetch=4)
    assert ids_of(take(early, 2)) == ids_of(want[:2])
    state = early.state_dict()
    assert state["samples_consumed"] == 2 * 6
    resumed = LatentLoader(LatentDataset(store), batch_size=3, dp_rank=1, dp_size=2, seed=5)
    resumed.load_state_dict(state)
    assert ids_of(list(resumed)) == ids_of(want[2:])


def test_one_read_per_shard_and_the_step_no_longer_waits(store, monkeypatch):
    dataset = LatentDataset(store)
    calls = []
    read = pq.ParquetFile.read_row_groups
    # This thread's reads only: an earlier test's loader may still finish a read it had started ahead.
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda self, *a, **k: (
        threading.current_thread() is threading.main_thread() and calls.append(a)) or read(self, *a, **k))
    samples = dataset.samples([3, 0, 1, 20, 2])  # four rows of shard 0, one of shard 1
    assert [s["index"] for s in samples] == [3, 0, 1, 20, 2] and len(calls) == 2
    assert [s["id"] for s in samples] == [dataset[i]["id"] for i in (3, 0, 1, 20, 2)]

    slow = dataset.samples
    monkeypatch.setattr(dataset, "samples", lambda indices: time.sleep(0.05) or slow(indices))
    for prefetch in (0, 3):
        loader = LatentLoader(dataset, batch_size=2, dp_rank=0, dp_size=1, seed=0, prefetch=prefetch)
        waits = []
        for n, _batch in enumerate(loader):
            waits.append(loader.perf_metrics()["perf/data_wait_s"])
            time.sleep(0.15)  # the training step: longer than a read, so prefetch keeps up
            if n == 4:
                break
        if prefetch:
            assert max(waits[1:]) < 0.05, waits  # less than one read: only the first batch is waited for
        else:
            assert min(waits) >= 0.05, waits  # read on the step's critical path
    # Asked once per logging interval, as the trainer does: the mean and the longest wait of the window.
    loader = LatentLoader(dataset, batch_size=2, dp_rank=0, dp_size=1, seed=0, prefetch=0)
    batches = iter(loader)
    next(batches), next(batches), next(batches)
    window = loader.perf_metrics()
    assert 0.05 <= window["perf/data_wait_s"] <= window["perf/data_wait_max_s"], window
    next(batches)
    assert loader.perf_metrics()["perf/data_wait_max_s"] == loader.last_wait_s  # a new window: one batch


def test_read_ahead_crosses_epoch_ends_with_the_same_batches(store, monkeypatch):
    """The read-ahead goes on into the next epoch while this one's last steps run: no batch after the
    first is waited for, also at epoch starts; the batches are those of a loader without prefetch, and
    a loader moved by load_state_dict drops what it had read ahead."""
    dataset = LatentDataset(store)
    reference = LatentLoader(dataset, batch_size=4, dp_rank=0, dp_size=1, seed=3, prefetch=0)
    per_epoch = len(reference)
    expected = [b["ids"] for _ in range(3) for b in reference]  # three epochs
    slow = dataset.samples
    monkeypatch.setattr(dataset, "samples", lambda indices: time.sleep(0.02) or slow(indices))
    loader = LatentLoader(dataset, batch_size=4, dp_rank=0, dp_size=1, seed=3, prefetch=3)
    got, waits = [], []
    for _ in range(3):
        for batch in loader:
            got.append(batch["ids"])
            waits.append(loader.perf_metrics()["perf/data_wait_s"])
            time.sleep(0.06)  # the training step: three reads long
    assert got == expected and loader.epoch == 3
    assert max(waits[1:]) < 0.02, (per_epoch, waits)  # epoch starts included
    loader.load_state_dict(reference.state_dict())  # reference stands at the start of epoch 3
    assert next(iter(loader))["ids"] == next(iter(reference))["ids"]
    loader.close()
