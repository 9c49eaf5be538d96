"""The model runner of a tensor-parallel group's leader: each operation on the model or the KV
cache goes to the group's other ranks first (StepSync), then runs on the leader's own shard.

The host and disk KV tiers go the same way: each rank has its own, of its shard, and repeats the
leader's copies and disk jobs (ranks/engine/group_tiers.py).

The other ranks run plain ModelRunners over their shards and do what arrives, in the same order
(ranks/follower.py); their collectives (the row-parallel all-reduces, the vocab all-gather) meet the
leader's inside the forward. A tp=1 worker uses ModelRunner itself: nothing here is on its path.
"""

from __future__ import annotations

import torch

from kvrelay.ranks.engine.group_tiers import GroupDiskStore, GroupHostMemory
from kvrelay.ranks.engine.model_runner import ModelRunner, StepArrays
from kvrelay.ranks.engine.step_sync import CopyBlocks, StepSync


class LeaderRunner(ModelRunner):
    def __init__(self, *args, sync: StepSync, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        assert sync.is_leader
        self.sync = sync

    def run(self, a: StepArrays, fed: torch.Tensor | None = None) -> torch.Tensor:
        # The followers take their ids from the arrays: a group never defers its sampled ids
        # (Engine.step reads them at once when tp > 1), so nothing is fed here.
        assert fed is None, "a tensor-parallel group reads its sampled ids before the next step"
        self.sync.publish(a)
        return super().run(a)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        self.sync.publish(CopyBlocks(src, dst))
        super().copy_blocks(src, dst)

    def allocate_host(self, num_slots: int) -> None:
        self.host = GroupHostMemory(self.kv_caches, num_slots, self.sync)

    def disk_store(self, root: str) -> GroupDiskStore:
        return GroupDiskStore(super().disk_store(root), self.sync, self.host)
