"""The parallel topology: data-parallel x sequence-parallel ranks and their process groups.

Rank layout (SP groups are contiguous ranks, so the ranks that exchange PoM states every layer sit
next to each other, usually on the same node):

    rank = dp_rank * sp + sp_rank

    world 8, dp=2, sp=4:   SP groups [0 1 2 3] [4 5 6 7]      DP groups [0 4] [1 5] [2 6] [3 7]

One object owns this layout (torchtitan's `ParallelDims`): it checks the degrees against the world
size, builds the groups once and hands them out. The model never sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from pipeline.parallel.sharding import plan_shard


@dataclass(kw_only=True)
class ParallelDims:
    """Data-parallel degree `dp` times sequence-parallel degree `sp` over `world_size` ranks.

    When torch.distributed is initialised and `build_groups` is True (the default), the process groups
    are built in `__post_init__`; every rank must then construct the same ParallelDims at the same
    point, because `new_group` is a collective over the whole world.
    """

    dp: int
    """Data-parallel degree: number of SP groups, each with its own samples."""

    sp: int
    """Sequence-parallel degree: ranks sharing one sample, each holding a contiguous slice of its
    token-frames. 1 disables sequence parallelism."""

    world_size: int | None = None
    """Number of ranks. None: torch.distributed's world size, or 1 when it is not initialised."""

    rank: int | None = None
    """This process's global rank. None: torch.distributed's rank, or 0 when it is not initialised."""

    build_groups: bool = True
    """Build the DP and SP process groups (needs torch.distributed initialised with world_size ranks).
    False: only the arithmetic (for planning and for tests without processes)."""

    _sp_groups: list = field(default_factory=list, init=False, repr=False)
    _dp_groups: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        for name in ("dp", "sp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelDims.{name}={value!r} must be a positive integer")
        initialised = dist.is_available() and dist.is_initialized()
        if self.world_size is None:
            self.world_size = dist.get_world_size() if initialised else 1
        if self.rank is None:
            self.rank = dist.get_rank() if initialised else 0
        if self.dp * self.sp != self.world_size:
            raise ValueError(
                f"ParallelDims: dp={self.dp} x sp={self.sp} = {self.dp * self.sp} does not match the "
                f"world size {self.world_size}; choose dp and sp whose product is {self.world_size}"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"ParallelDims.rank={self.rank} is outside the world of {self.world_size} ranks")
        if self.build_groups and initialised:
            if dist.get_world_size() != self.world_size:
                raise ValueError(
                    f"ParallelDims.world_size={self.world_size} differs from torch.distributed's "
                    f"world size {dist.get_world_size()}; leave world_size=None"
                )
            self._build()

    def _build(self) -> None:
        # new_group is collective over the whole world: every rank creates every group, in the same
        # order (all SP groups, then all DP groups), even the groups it is not a member of.
        self._sp_groups = [dist.new_group(ranks) for ranks in self.all_sp_group_ranks()]
        self._dp_groups = [dist.new_group(ranks) for ranks in self.all_dp_group_ranks()]

    # -- layout ---------------------------------------------------------------------------------------

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def sp_rank(self) -> int:
        """Position of this rank inside its SP group (which slice of token-frames it holds)."""
        return self.rank % self.sp

    @property
    def dp_rank(self) -> int:
        """Index of this rank's SP group, i.e. its data-parallel coordinate (give it to the loader)."""
        return self.rank // self.sp

    def all_sp_group_ranks(self) -> list[list[int]]:
        return [[d * self.sp + s for s in range(self.sp)] for d in range(self.dp)]

    def all_dp_group_ranks(self) -> list[list[int]]:
        return [[d * self.sp + s for d in range(self.dp)] for s in range(self.sp)]

    @property
    def sp_group_ranks(self) -> list[int]:
        """Global ranks of this rank's SP group (contiguous)."""
        return self.all_sp_group_ranks()[self.dp_rank]

    @property
    def dp_group_ranks(self) -> list[int]:
        """Global ranks holding the same slice position in every SP group."""
        return self.all_dp_group_ranks()[self.sp_rank]

    # -- groups ---------------------------------------------------------------------------------------

    def _group(self, groups: list, index: int, what: str):
        if not groups:
            raise RuntimeError(
                f"ParallelDims has no {what} process group: initialise torch.distributed before "
                f"building ParallelDims (and keep build_groups=True)"
            )
        return groups[index]

    @property
    def sp_group(self):
        """Process group of this rank's SP group (PoM state collectives run on it)."""
        return self._group(self._sp_groups, self.dp_rank, "SP")

    @property
    def dp_group(self):
        """Process group of this rank's DP group (gradient averaging across samples)."""
        return self._group(self._dp_groups, self.sp_rank, "DP")

    # -- checks ---------------------------------------------------------------------------------------

    def check_frames(self, token_frames: int) -> None:
        """Sequence parallelism shards whole token-frames (padded at the end to a multiple of sp), so
        sp may not exceed the number of token-frames: beyond that, ranks would hold only padding."""
        plan_shard(token_frames, self.sp, self.sp_rank)
