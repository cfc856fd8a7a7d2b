"""Loss weighting and gradient reduction for sequence parallelism combined with data parallelism.

Within one SP group (P ranks, the same samples, different token-frames), rank r computes

    L_r = mean_b( sum of its squared errors over its valid elements of sample b / N_b )

where N_b is the number of valid elements of sample b in the WHOLE video (known on every rank from
the unsharded frame mask, so no collective is needed). The ranks' losses sum to the single-device
loss, mean_b(mean over sample b's valid elements), whatever the padding; so do their gradients,
because PoM's collectives route every cross-rank dependency back in backward. Hence:

    gradient of one SP group's samples = SUM over the group's ranks of the local gradients.

Across DP groups the gradients are averaged. With G_{d,s} the local gradient of rank (dp d, sp s):

    wanted = (1 / dp) * sum_d sum_s G_{d,s}

- DeepSpeed's data-parallel group = the whole world (dp * sp ranks, e.g. DeepSpeed-Ulysses'
  "sequence data parallel" group, or simply no custom group): DeepSpeed averages over dp * sp ranks,
  (1 / (dp sp)) sum_{d,s} G, so multiply each rank's loss by sp.
- DeepSpeed's data-parallel group = the DP group only (dp ranks with the same sp rank): it averages
  (1 / dp) sum_d G_{d,s}, different on each SP rank. Multiply by 1 and ALSO sum the gradients over
  the SP group (`sum_gradients_over_sp`) before the optimizer step.

`deepspeed_loss_factor` returns these factors; docs/sequence_parallel.md explains the choice. Which
of the two DeepSpeed actually does (ZeRO-2/3 reduce in backward hooks over their own group) is for
the trainer to verify with a test.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.models.flow import flow_matching_loss
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.sharding import FrameShard

GRADIENT_AVERAGING = ("world", "dp")


def global_loss_mask(shard: FrameShard, loss_frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, F_pad) bool: the token-frames of the whole video that count in the loss.

    loss_frame_mask (B, F) over the unpadded video, optional, e.g. `frame_mask & (timesteps > 0)` to
    drop the clean prefix of block-causal training; padding is always excluded.
    """
    mask = shard.global_frame_mask
    if loss_frame_mask is None:
        return mask
    if tuple(loss_frame_mask.shape) != (mask.shape[0], shard.token_frames):
        raise ValueError(f"loss_frame_mask must be ({mask.shape[0]}, {shard.token_frames}) over the "
                         f"unpadded token-frames, got {tuple(loss_frame_mask.shape)}")
    extra = shard.padded_token_frames - shard.token_frames
    return mask & F.pad(loss_frame_mask.bool().to(mask.device), (0, extra), value=False)


def loss_normaliser(shard: FrameShard, local_shape: torch.Size | tuple[int, ...],
                    loss_frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) number of valid elements of each sample in the whole video (the SP loss divides by it).

    local_shape: (B, C, T_local, H, W) of the local prediction.
    """
    _, channels, _, height, width = local_shape
    frames = global_loss_mask(shard, loss_frame_mask).sum(dim=1)  # (B,) valid token-frames
    return frames.float() * (shard.patch_t * channels * height * width)


def sequence_parallel_loss(pred: torch.Tensor, target: torch.Tensor, shard: FrameShard,
                           loss_frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of the flow-matching loss: pred, target (B, C, T_local, H, W) local.

    Summed over the SP group it equals `flow_matching_loss` on the unsharded video (same masks).
    """
    mask = global_loss_mask(shard, loss_frame_mask)[:, shard.local_slice]  # (B, F_local)
    normaliser = loss_normaliser(shard, pred.shape, loss_frame_mask)
    return flow_matching_loss(pred, target, mask, normaliser=normaliser)


def deepspeed_loss_factor(dims: ParallelDims, gradient_averaging: str) -> float:
    """Factor to multiply each rank's SP loss by before `engine.backward`.

    gradient_averaging: "world" when DeepSpeed's data-parallel group is all dp * sp ranks (its
    gradient averaging divides by dp * sp): returns sp. "dp" when it is only the DP group (divides by
    dp): returns 1, and the trainer must also call `sum_gradients_over_sp`.
    """
    if gradient_averaging == "world":
        return float(dims.sp)
    if gradient_averaging == "dp":
        return 1.0
    raise ValueError(f"gradient_averaging={gradient_averaging!r} is unknown; use one of {GRADIENT_AVERAGING}")


def loss_for_logging(local_loss: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """The batch's loss from each rank's unscaled SP loss: summed over SP, averaged over DP (one
    all-reduce over the world). Every rank gets it; log it on rank 0."""
    total = local_loss.detach().float().clone()
    if dims.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dims.dp


def _all_reduce_grads(parameters: Iterable[torch.nn.Parameter], group, divide_by: int) -> None:
    # One flat message per call rather than one per parameter: fewer, larger collectives.
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    if divide_by != 1:
        flat /= divide_by
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_gradients_over_sp(parameters: Iterable[torch.nn.Parameter], dims: ParallelDims) -> None:
    """All-reduce (SUM) every gradient over this rank's SP group, in place."""
    if dims.sp_enabled:
        _all_reduce_grads(parameters, dims.sp_group, 1)


def average_gradients_over_dp(parameters: Iterable[torch.nn.Parameter], dims: ParallelDims) -> None:
    """All-reduce (AVG) every gradient over this rank's DP group, in place: what plain DDP does (for
    tests and for training without DeepSpeed). Combine with `sum_gradients_over_sp` (factor 1)."""
    if dims.dp_enabled:
        _all_reduce_grads(parameters, dims.dp_group, dims.dp)
