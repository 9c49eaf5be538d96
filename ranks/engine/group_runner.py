"""The model runner of a tensor-parallel group's leader: each operation on the model or the KV
cache goes to the group's other ranks first (StepSync), then runs on the leader's own shard.

The other ranks run plain ModelRunners over their shards and do what arrives, in the same order
(ranks/follower.py); their collectives (the row-parallel all-reduces, the vocab all-gather) meet the
leader's inside the forward. A tp=1 worker uses ModelRunner itself: nothing here is on its path.
"""

from __future__ import annotations

import torch

from kvrelay.ranks.engine.model_runner import ModelRunner, StepArrays
from kvrelay.ranks.engine.step_sync import CopyBlocks, CopyIn, CopyOut, StepSync


class LeaderRunner(ModelRunner):
    def __init__(self, *args, sync: StepSync, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        assert sync.is_leader
        self.sync = sync

    def run(self, a: StepArrays) -> torch.Tensor:
        self.sync.publish(a)
        return super().run(a)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        self.sync.publish(CopyBlocks(src, dst))
        super().copy_blocks(src, dst)

    def copy_out(self, block_ids: list[int], slots: list[int]) -> None:
        self.sync.publish(CopyOut(block_ids, slots))
        super().copy_out(block_ids, slots)

    def copy_in(self, slots: list[int], block_ids: list[int]) -> None:
        self.sync.publish(CopyIn(slots, block_ids))
        super().copy_in(slots, block_ids)
