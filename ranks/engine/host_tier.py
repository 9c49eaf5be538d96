"""HostTier: the bookkeeping of a worker's host-memory KV tier, below its GPU cache (no torch here).

The host tier holds copies of blocks that the GPU cache evicted, in `num_slots` slots of host
memory (the runner owns the memory: `copy_out` / `copy_in`). This class only moves ints: an LRU of
block hashes -> slots, and the copies that the engine must issue before the next forward:

    offload(block_id, block_hash)  the GPU cache evicts a block: give it a slot (dropping the
                                   coldest unpinned host block if full) and queue GPU -> host
    match(hashes)                  host slots of the leading `hashes`, pinned until copied in
    onload(slot, block_id)         queue host -> GPU for a block a sequence was given
    take_copies()                  the queued copies, copy-outs first (the engine flushes them)

NOTE: copy-outs are flushed before copy-ins: a block that a sequence is given may be one whose
eviction queued its copy-out in the same step, and it must leave before its new contents land.
A slot matched for an onload is pinned, so an offload in the same step cannot overwrite it
before it is read. A hash may be on the GPU and on the host at once (a block brought in stays in
the host tier until the LRU drops it); evicting it again from the GPU then costs no copy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class HostTierStats:
    offloaded_blocks: int = 0  # GPU -> host copies
    onloaded_blocks: int = 0  # host -> GPU copies
    dropped_blocks: int = 0  # blocks the host LRU let go


class HostTier:
    def __init__(self, num_slots: int) -> None:
        assert num_slots > 0
        self.num_slots = num_slots
        self.lru: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, coldest first
        self.free_slots = list(range(num_slots - 1, -1, -1))  # popped lowest first: chunks fill in order
        self.pinned: dict[int, int] = {}  # slot -> pending onloads that read it
        self.copies_out: list[tuple[int, int]] = []  # (GPU block id, host slot), queued
        self.copies_in: list[tuple[int, int]] = []  # (host slot, GPU block id), queued
        self.stats = HostTierStats()
        self.on_add = None  # (block hash) -> None: the window's host table
        self.on_drop = None

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.lru

    def hashes(self) -> set[int]:
        return set(self.lru)

    def offload(self, block_id: int, block_hash: int) -> None:
        """The GPU cache is about to reuse `block_id`, which holds `block_hash`: keep a copy."""
        if block_hash in self.lru:
            self.lru.move_to_end(block_hash)
            return
        slot = self._free_slot()
        if slot is None:
            return  # every slot is pinned by this step's onloads: the block is dropped
        self.lru[block_hash] = slot
        self.copies_out.append((block_id, slot))
        self.stats.offloaded_blocks += 1
        if self.on_add is not None:
            self.on_add(block_hash)

    def match(self, hashes: list[int]) -> list[int]:
        """Slots of the leading `hashes` held here, made most recent and pinned (until the engine
        takes the copies; `unpin` if they will not be onloaded)."""
        out = []
        for h in hashes:
            slot = self.lru.get(h)
            if slot is None:
                break
            self.lru.move_to_end(h)
            self.pinned[slot] = self.pinned.get(slot, 0) + 1
            out.append(slot)
        return out

    def unpin(self, slots: list[int]) -> None:
        for s in slots:
            self.pinned[s] -= 1
            if not self.pinned[s]:
                del self.pinned[s]

    def onload(self, slot: int, block_id: int) -> None:
        assert slot in self.pinned
        self.copies_in.append((slot, block_id))
        self.stats.onloaded_blocks += 1

    def take_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The queued copies (copy-outs first, see the module NOTE); their slots are unpinned, as
        the caller issues the copies before anything else can touch the slots."""
        out, inn = self.copies_out, self.copies_in
        self.copies_out, self.copies_in = [], []
        self.unpin([s for s, _ in inn])
        return out, inn

    def _free_slot(self) -> int | None:
        if self.free_slots:
            return self.free_slots.pop()
        for h, slot in self.lru.items():  # coldest first; pinned slots are few (one step's onloads)
            if slot not in self.pinned:
                del self.lru[h]
                self.stats.dropped_blocks += 1
                if self.on_drop is not None:
                    self.on_drop(h)
                return slot
        return None
