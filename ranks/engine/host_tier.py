"""HostTier: the bookkeeping of a worker's host-memory KV tier, below its GPU cache (no torch here).

The host tier holds copies of blocks that the GPU cache evicts, in `num_slots` slots of host
memory (the runner owns the memory and a copy stream). This class only moves ints: an LRU of
block hashes -> slots, the copies the engine must issue, and which copies are still in flight:

    write_ahead(block_id, hash)    a cached block near the free list's cold end: copy it out now,
                                   on the copy stream, so its eviction later costs nothing
    offload(block_id, block_hash)  the GPU cache evicts a block: a no-op if the host holds its hash
                                   already (dedupe), else give it a slot and queue GPU -> host
    match(hashes)                  host slots of the leading `hashes`, pinned until copied in
    onload(slot, block_id)         queue host -> GPU for a block a sequence was given
    take_batch()                   the queued copies as one numbered batch (copy-outs first)
    spill_candidates(n)            with a disk tier: the coldest held blocks, once the tier is
                                   nearly full, whose copy-outs completed (written to disk ahead)
    reserve()                      a scratch slot, pinned, for a block read back from disk
    reuse(block_id)                the GPU cache hands the block to a new owner: the batch whose
                                   copy-out of it the next write must wait for (-1: none)
    done(batch)                    every batch up to `batch` has completed on the copy stream

NOTE: one copy stream, in batch order: a copy-in into a block whose copy-out is in flight runs after
it, and a slot's new copy-out after the copy-in that read it. Only the compute stream needs an
explicit wait, before it writes a block whose copy-out is in flight (`reuse`); write-ahead makes that
wait rare and short: the copy left when the block neared the cold end, not when it was taken.
A slot matched for an onload is pinned until its batch completes, so no copy-out overwrites it
first. A hash may be on the GPU and on the host at once; evicting it then costs no copy.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import islice
from dataclasses import dataclass, field


@dataclass
class HostTierStats:
    offloaded_blocks: int = 0  # GPU -> host copies
    written_ahead_blocks: int = 0  # of those, copied before their eviction
    deduped_blocks: int = 0  # evictions of blocks the host held already (no copy)
    onloaded_blocks: int = 0  # host -> GPU copies
    dropped_blocks: int = 0  # blocks the host LRU let go


@dataclass
class CopyBatch:
    """One batch of copies for the copy stream, in this order."""

    number: int
    out: list[tuple[int, int]] = field(default_factory=list)  # (GPU block id, host slot)
    inn: list[tuple[int, int]] = field(default_factory=list)  # (host slot, GPU block id)


class HostTier:
    def __init__(self, num_slots: int) -> None:
        assert num_slots > 0
        self.num_slots = num_slots
        self.lru: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, coldest first
        self.free_slots = list(range(num_slots - 1, -1, -1))  # popped lowest first: chunks fill in order
        self.pinned: dict[int, int] = {}  # slot -> pending onloads that read it
        self.queued = CopyBatch(0)  # the next batch, filling
        self.completed = -1  # every batch up to this one has completed
        self.writing: dict[int, int] = {}  # GPU block id -> batch of its copy-out, until it completes
        self.reading: list[tuple[int, list[int]]] = []  # (batch, slots its copy-ins read), in order
        self.filled: dict[int, int] = {}  # slot -> the batch of the copy-out that filled it
        self.scratch: set[int] = set()  # reserved slots (disk reads), freed when unpinned
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
            self.stats.deduped_blocks += 1
            return
        self._copy_out(block_id, block_hash)

    def write_ahead(self, block_id: int, block_hash: int) -> None:
        """Copy out a cached block that the GPU cache may evict soon (it holds it still)."""
        if block_hash not in self.lru and block_id not in self.writing and self._copy_out(block_id, block_hash):
            self.stats.written_ahead_blocks += 1

    def _copy_out(self, block_id: int, block_hash: int) -> bool:
        slot = self._free_slot()
        if slot is None:
            return False  # every slot is pinned by onloads in flight: the block is dropped
        self.lru[block_hash] = slot
        self.filled[slot] = self.queued.number
        self.queued.out.append((block_id, slot))
        self.writing[block_id] = self.queued.number
        self.stats.offloaded_blocks += 1
        if self.on_add is not None:
            self.on_add(block_hash)
        return True

    def match(self, hashes: list[int]) -> list[int]:
        """Slots of the leading `hashes` held here, made most recent and pinned (until their
        copy-ins complete; `unpin` if they will not be onloaded)."""
        out = []
        for h in hashes:
            slot = self.lru.get(h)
            if slot is None:
                break
            self.lru.move_to_end(h)
            self.pinned[slot] = self.pinned.get(slot, 0) + 1
            out.append(slot)
            if self.on_add is not None:  # used again: the window's host table keeps it longer
                self.on_add(h)
        return out

    def pin_settled(self, hashes: list[int]) -> list[int]:
        """Slots of the leading `hashes` held here whose copy-outs completed, pinned (another
        worker pulls them: ranks/pulls.py); `unpin` lets them go. Their LRU order stays."""
        out = []
        for h in hashes:
            slot = self.lru.get(h)
            if slot is None or self.filled[slot] > self.completed:
                break
            self.pin(slot)
            out.append(slot)
        return out

    def pin(self, slot: int) -> None:
        self.pinned[slot] = self.pinned.get(slot, 0) + 1

    def unpin(self, slots: list[int]) -> None:
        for s in slots:
            self.pinned[s] -= 1
            if not self.pinned[s]:
                del self.pinned[s]
                if s in self.scratch:
                    self.scratch.remove(s)
                    self.free_slots.append(s)

    def reserve(self) -> int | None:
        """A pinned slot outside the LRU (a disk read lands there, then is copied in); it returns to
        the free slots once unpinned. None if every slot is pinned."""
        slot = self._free_slot(settled=True)
        if slot is not None:
            self.scratch.add(slot)
            self.pin(slot)
        return slot

    def spill_candidates(self, n: int) -> list[tuple[int, int]]:
        """(hash, slot) of the `n` coldest blocks held, if the tier is within `n` slots of full (the
        next to be dropped), whose copy-outs completed; none otherwise."""
        if len(self.lru) + n < self.num_slots:
            return []
        return [(h, s) for h, s in islice(self.lru.items(), n) if self.filled[s] <= self.completed]

    def onload(self, slot: int, block_id: int) -> int:
        """Queue host `slot` -> GPU `block_id`; the batch that will carry it."""
        assert slot in self.pinned
        self.queued.inn.append((slot, block_id))
        self.stats.onloaded_blocks += 1
        return self.queued.number

    def reuse(self, block_id: int) -> int:
        """The batch whose copy-out of `block_id` a new write of the block must wait for, or -1."""
        return self.writing.get(block_id, -1)

    def take_batch(self) -> CopyBatch | None:
        """The queued copies as one batch for the copy stream, or None if nothing is queued."""
        b = self.queued
        if not b.out and not b.inn:
            return None
        self.queued = CopyBatch(b.number + 1)
        if b.inn:
            self.reading.append((b.number, [s for s, _ in b.inn]))
        return b

    def done(self, batch: int) -> None:
        """Every batch up to `batch` completed: their blocks are free to write, their slots to reuse."""
        if batch <= self.completed:
            return
        self.completed = batch
        if self.writing:
            self.writing = {b: n for b, n in self.writing.items() if n > batch}
        while self.reading and self.reading[0][0] <= batch:
            self.unpin(self.reading.pop(0)[1])

    def _free_slot(self, settled: bool = False) -> int | None:
        """A free slot, else the coldest unpinned one's (dropping its block); with `settled`, only
        one that no copy-out in flight or queued still writes (the disk thread writes it next)."""
        if self.free_slots:
            return self.free_slots.pop()
        for h, slot in self.lru.items():  # coldest first; pinned slots are few (onloads in flight)
            if slot not in self.pinned and (not settled or self.filled[slot] <= self.completed):
                del self.lru[h]
                self.stats.dropped_blocks += 1
                if self.on_drop is not None:
                    self.on_drop(h)
                return slot
        return None
