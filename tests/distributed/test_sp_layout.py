"""The arithmetic of sequence parallelism, checked without processes: rank layout and errors of
ParallelDims, sharding along token-frames (padding, offsets, round trip), the SP loss weighting
(ranks' losses sum to the unsharded loss), the DeepSpeed loss factors and the byte counter."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.flow import flow_matching_loss
from pipeline.parallel.collectives import CommCounter
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.loss import deepspeed_loss_factor, sequence_parallel_loss
from pipeline.parallel.sharding import plan_shard, shard_latents


def test_rank_layout_sp_groups_are_contiguous():
    layout = [ParallelDims(dp=2, sp=4, world_size=8, rank=r) for r in range(8)]
    assert layout[0].all_sp_group_ranks() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout[0].all_dp_group_ranks() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [(d.dp_rank, d.sp_rank) for d in layout] == [(r // 4, r % 4) for r in range(8)]
    assert layout[6].sp_group_ranks == [4, 5, 6, 7] and layout[6].dp_group_ranks == [2, 6]
    assert layout[0].sp_enabled and layout[0].dp_enabled
    assert not ParallelDims(dp=3, sp=1, world_size=3).sp_enabled  # any world size


def test_world_size_mismatch_names_the_three_numbers():
    with pytest.raises(ValueError, match=r"dp=2 x sp=2 = 4 does not match the world size 3"):
        ParallelDims(dp=2, sp=2, world_size=3)
    with pytest.raises(ValueError, match=r"ParallelDims.sp=0 must be a positive integer"):
        ParallelDims(dp=1, sp=0, world_size=1)


def test_groups_need_torch_distributed():
    with pytest.raises(RuntimeError, match="initialise torch.distributed"):
        _ = ParallelDims(dp=1, sp=2, world_size=2, rank=0).sp_group


@pytest.mark.parametrize("frames,sp", [(4, 2), (5, 2), (5, 4), (7, 3), (8, 8), (3, 1)])
def test_shards_cover_the_video_in_order(frames, sp):
    latents = torch.randn(2, 3, frames * 2, 2, 2)  # patch_t = 2
    frame_mask = torch.ones(2, frames, dtype=torch.bool)
    frame_mask[1, 0] = False
    pieces, masks, offsets = [], [], []
    for rank in range(sp):
        local, shard = shard_latents(latents, sp_rank=rank, sp_size=sp, patch_t=2, frame_mask=frame_mask)
        assert local.shape[2] == 2 * shard.local_token_frames and shard.padded_token_frames % sp == 0
        assert shard.padded_token_frames - frames < sp  # the least padding
        pieces.append(local), masks.append(shard.frame_mask), offsets.append(shard.frame_offset)
    assert offsets == [r * shard.local_token_frames for r in range(sp)]
    torch.testing.assert_close(torch.cat(pieces, dim=2)[:, :, : frames * 2], latents, rtol=0, atol=0)
    assert torch.cat(pieces, dim=2)[:, :, frames * 2:].abs().sum() == 0  # padding is zeros
    full_mask = torch.cat(masks, dim=1)
    assert torch.equal(full_mask[:, :frames], frame_mask) and not full_mask[:, frames:].any()


def test_sp_larger_than_frames_is_a_clear_error():
    with pytest.raises(ValueError, match="sp=4 is larger than the number of latent token-frames 3"):
        shard_latents(torch.zeros(1, 2, 3, 2, 2), sp_rank=0, sp_size=4)
    with pytest.raises(ValueError, match="sp=3 is larger than the number of latent token-frames 2"):
        ParallelDims(dp=1, sp=3, world_size=3).check_frames(2)
    with pytest.raises(ValueError, match="not a multiple of patch_t=2"):
        shard_latents(torch.zeros(1, 2, 3, 2, 2), sp_rank=0, sp_size=1, patch_t=2)
    assert plan_shard(2, 4, 3, allow_idle_ranks=True) == (4, 3)


@pytest.mark.parametrize("frames,sp", [(4, 2), (5, 3), (5, 4)])
def test_sp_losses_sum_to_the_unsharded_loss(frames, sp):
    pred, target = torch.randn(3, 2, frames, 4, 4), torch.randn(3, 2, frames, 4, 4)
    frame_mask = torch.ones(3, frames, dtype=torch.bool)
    frame_mask[1, -2:] = False
    loss_mask = torch.rand(3, frames) > 0.3
    expected = flow_matching_loss(pred, target, frame_mask & loss_mask)
    total = 0.0
    for rank in range(sp):
        local_pred, shard = shard_latents(pred, sp_rank=rank, sp_size=sp, frame_mask=frame_mask)
        local_target = shard.shard(target, dim=2)
        total = total + sequence_parallel_loss(local_pred, local_target, shard, loss_frame_mask=loss_mask)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)


def test_deepspeed_loss_factor():
    dims = ParallelDims(dp=2, sp=4, world_size=8, rank=0)
    assert deepspeed_loss_factor(dims, "world") == 4.0  # DeepSpeed divides by dp * sp = 8
    assert deepspeed_loss_factor(dims, "dp") == 1.0  # divides by dp; the SP sum is ours
    with pytest.raises(ValueError, match="gradient_averaging='sp'"):
        deepspeed_loss_factor(dims, "sp")


def test_counter_totals_per_layer_step_and_direction():
    counter = CommCounter()
    x = torch.zeros(3, 9)  # 108 bytes
    counter.record(layer="blocks.0.self_pom", direction="forward", op="all_reduce", tensor=x, group_size=4)
    counter.record(layer="blocks.0.self_pom", direction="backward", op="all_reduce", tensor=x, group_size=4)
    counter.next_step()
    counter.record(layer="blocks.1.self_pom", direction="forward", op="all_gather", tensor=x, group_size=4)
    assert counter.per_layer(0) == {"blocks.0.self_pom": {"forward": 108, "backward": 108, "calls": 2}}
    assert counter.bytes(step=1) == 108 and counter.bytes() == 324
    assert counter.bytes(step=0, wire=True) == 2 * 108 * 2 * 3 / 4  # ring all-reduce
    assert counter.bytes(step=1, wire=True) == 108 * 3  # ring all-gather
    counter.reset()
    assert counter.records == [] and counter.step == 0


def test_counter_memory_is_constant_over_a_long_run():
    """10,000 steps of 2 micro-batches x 28 layers x 2 directions: the counter holds a bounded number of
    aggregates, keeps the last steps exactly, and its window gives the bytes per step for logging."""
    counter = CommCounter(keep_steps=4)
    x = torch.zeros(3, 9)  # 108 bytes
    sizes = []
    for step in range(10_000):
        for _micro in range(2):
            for layer in range(28):
                for direction in ("forward", "backward"):
                    counter.record(layer=f"blocks.{layer}.self_pom", direction=direction, op="all_reduce", tensor=x,
                                   group_size=2)
        counter.next_step()
        if step % 100 == 99:
            window = counter.take_window()
            assert window == {"forward": 100 * 2 * 28 * 108, "backward": 100 * 2 * 28 * 108,
                              "calls": 100 * 2 * 28 * 2, "steps": 100}
        sizes.append(counter.size())
    assert max(sizes) <= (4 + 1) * 28 * 2 and sizes[-100:] == sizes[100:200]  # the same every window
    assert counter.per_layer(9_999)["blocks.0.self_pom"] == {"forward": 216, "backward": 216, "calls": 4}
    assert counter.select(step=9_000) == [] and counter.calls() == 4 * 28 * 2 * 2
