"""KVCacheManager: which blocks hold which sequence's KV (no torch here; vLLM v1's split).

The scheduler decides what runs; this manager keeps the blocks: it hashes a sequence's full
blocks, matches its prefix against the cache, allocates (evicting cold cached blocks), registers
computed blocks, reserves blocks for KV that another worker sends, and frees a sequence's blocks.
The BlockPool below it is plain bookkeeping; every moment that someone outside may care about
passes through here:

    on_cache(block_hash)           a block became findable (the worker's window adds it), or a
                                   new sequence's prefix hit uses it again (the window marks it used)
    on_evict(block_id, block_hash) a cached block is about to be reused: its KV is still intact,
                                   so this is the one place a host tier copies it out first

Blocks in the making: `computing` maps the hash of each full block that an admitted sequence will
compute (past its cache hits) to that sequence, from admission until the block is registered or
the sequence lets its blocks go (finished, preempted). The scheduler holds back a waiting sequence
whose next uncached block is in there (`computed_elsewhere`), so two sequences never compute one
prefix side by side: one dict lookup per waiting sequence, no scan of the running ones.

NOTE: eviction happens only inside `allocate`, and always through `on_evict`, so "the block is
leaving the cache" is one distinct moment with the block's bytes still readable. A tier (issue 15)
hooks there, and a sequence whose blocks are on their way in can be given blocks by `reserve`
and registered by `adopt` when they land, as handed-off KV is today.

With a host tier (ranks/engine/host_tier.py), every eviction is offered to it before the hook,
`write_ahead` copies out the cached blocks nearest the free list's cold end before they are
evicted, `match_host` extends a GPU prefix match into it, and `admit` queues the copy-in of those
blocks into the sequence's first fresh blocks. The copies run on a side stream; the sequence is
*loading* until their batch completes (`landed` then registers the blocks, so no other sequence
reads them early; until then their hashes are in `computing`, and a sequence sharing them waits).
A block taken while its copy-out is in flight raises `barrier`: the engine orders the compute
stream's next write after that batch.

With a disk tier below the host (ranks/engine/disk_tier.py), `spill` writes the host's coldest
blocks to disk ahead of their drop, `match_disk` extends the match past the host hits, and `admit`
gives each disk block a scratch host slot to be read into: the engine issues `disk_jobs` to the
disk thread, and `disk_done` queues each read block's copy-in (or cuts the load at a failed read:
the sequence recomputes from there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

from kvrelay.core.block_hash import block_hashes, num_blocks
from kvrelay.ranks.engine.block_pool import BlockPool
from kvrelay.ranks.engine.disk_tier import DiskTier
from kvrelay.ranks.engine.host_tier import HostTier
from kvrelay.ranks.engine.sequence import Sequence

EvictHook = Callable[[int, int], None]  # (block id, block hash), before the block is reused
CacheHook = Callable[[int], None]  # (block hash), once the block is findable


@dataclass
class Load:
    """A loading sequence's blocks [first, first + count) coming in from the host tier, the last
    `count - disk_from` of them read from disk first."""

    first: int
    count: int
    disk_from: int
    reads_left: int
    batch: int = -1  # the copy batch of its last copy-in so far
    counted: bool = False  # its hits were counted (first admission)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, hash_seed: int, enable_caching: bool = True,
                 host: HostTier | None = None, disk: DiskTier | None = None) -> None:
        self.pool = BlockPool(num_blocks, block_size, enable_caching)
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.host = host if enable_caching else None
        self.disk = disk if self.host is not None else None
        self.gpu_hit_blocks = 0  # prefix hits at first admission, per tier (`count_hits`)
        self.host_hit_blocks = 0
        self.disk_hit_blocks = 0
        self.disk_jobs: list[tuple[str, int, int]] = []  # (op "w" | "r" | "d", hash, slot) for the disk thread
        self.reads: dict[int, tuple[Sequence, int]] = {}  # scratch slot -> (loading sequence, index of the block it fills)
        self.spilling: dict[int, int] = {}  # hash -> host slot being written to disk
        self.on_cache: CacheHook | None = None
        self.on_evict: EvictHook | None = None
        self.computing: dict[int, Sequence] = {}  # block hash -> the admitted sequence computing (or loading) it
        self.loading: dict[Sequence, Load] = {}
        self.barrier = -1  # the copy batch the compute stream's next write of a taken block must follow

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return num_blocks(num_tokens, self.block_size)

    # --- hashing and the prefix cache ---------------------------------------------------------

    def extend_hashes(self, seq: Sequence) -> list[int]:
        """Hash the sequence's full blocks that have no hash yet (the chain is extended, not redone)."""
        have = len(seq.block_hashes)
        if seq.num_tokens // self.block_size > have:
            parent = seq.block_hashes[-1] if have else None
            seq.block_hashes += block_hashes(seq.token_ids, self.block_size, self.hash_seed, have, parent)
        return seq.block_hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks of the sequence's longest cached prefix, leaving at least its last token to
        compute (its logits give the next token). No references are taken."""
        hashes = self.extend_hashes(seq)
        return self.pool.match_prefix(hashes[: (seq.num_tokens - 1) // self.block_size])

    def computed_elsewhere(self, seq: Sequence, hits: list[int]) -> bool:
        """Another sequence is computing the block that follows `seq`'s cache hits (a prefix they
        share): `seq` should wait for it to be registered rather than compute it too."""
        i = len(hits)
        if not self.pool.enable_caching or i >= (seq.num_tokens - 1) // self.block_size:
            return False
        owner = self.computing.get(seq.block_hashes[i])
        return owner is not None and owner is not seq

    def match_host(self, seq: Sequence, num_gpu_hits: int) -> list[int]:
        """Host slots of the blocks that follow the sequence's `num_gpu_hits` GPU hits, pinned;
        pass them to `admit` (which onloads or unpins them)."""
        if self.host is None:
            return []
        return self.host.match(self.extend_hashes(seq)[num_gpu_hits : (seq.num_tokens - 1) // self.block_size])

    def match_disk(self, seq: Sequence, num_hits: int) -> list[int]:
        """Hashes of the blocks on disk that follow the sequence's `num_hits` GPU and host hits,
        held; pass them to `admit` (which reads them back or lets them go)."""
        if self.disk is None:
            return []
        return self.disk.match(self.extend_hashes(seq)[num_hits : (seq.num_tokens - 1) // self.block_size])

    # --- blocks -------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """`n` free blocks, coldest first; cached blocks among them are evicted through `on_evict`."""
        blocks, evicted = self.pool.take(n)
        if self.host is not None:
            self.barrier = max([self.barrier, *(self.host.reuse(b) for b in blocks)])
        for block_id, block_hash in evicted:
            if self.host is not None:
                self.host.offload(block_id, block_hash)
            if self.on_evict is not None:
                self.on_evict(block_id, block_hash)
        return blocks

    def register(self, block_id: int, block_hash: int) -> None:
        if self.pool.register(block_id, block_hash) and self.on_cache is not None:
            self.on_cache(block_hash)

    def admit(self, seq: Sequence, hits: list[int], num_tokens: int, host_slots: list[int] = (),
              disk_hashes: list[int] = ()) -> bool:
        """Give a new sequence the cache hits `hits` and fresh blocks up to `num_tokens` tokens,
        the first of them filled from `host_slots` (from `match_host`), then from disk
        (`disk_hashes`, from `match_disk`); False (nothing taken, the slots and hashes let go) if
        the free blocks do not cover them."""
        assert not seq.block_ids
        need = self.blocks_for(num_tokens) - len(hits)
        if need > self.pool.num_free_after_touch(hits):
            self.admit_failed(host_slots, disk_hashes)
            return False
        assert len(host_slots) + len(disk_hashes) <= need
        self.pool.touch(hits)
        if self.on_cache is not None:
            for h in seq.block_hashes[: len(hits)]:
                self.on_cache(h)
        fresh = self.allocate(need)
        seq.block_ids = hits + fresh
        if host_slots or disk_hashes:
            load = self.loading[seq] = Load(len(hits), len(host_slots) + len(disk_hashes), len(host_slots), 0)
            for slot, block_id in zip(host_slots, fresh):
                load.batch = self.host.onload(slot, block_id)
            for i, h in enumerate(disk_hashes):
                slot = self.host.reserve()
                if slot is None:  # every host slot is pinned: compute the rest
                    load.count = load.disk_from + i
                    for rest in disk_hashes[i:]:
                        self.disk.read_done(rest, None)
                    break
                self.disk_jobs.append(("r", h, slot))
                self.reads[slot] = (seq, load.first + load.disk_from + i)
                load.reads_left += 1
        if self.pool.enable_caching:
            for h in seq.block_hashes[len(hits) :]:
                self.computing.setdefault(h, seq)  # the first to compute a block keeps it (as BlockPool.register)
        return True

    def landed(self) -> list[Sequence]:
        """Loading sequences whose reads and copy-ins completed: their blocks are registered now,
        and one whose load was cut at a failed disk read computes from there."""
        done = [seq for seq, ld in self.loading.items() if not ld.reads_left and ld.batch <= self.host.completed]
        for seq in done:
            ld = self.loading.pop(seq)
            for i in range(ld.first, ld.first + ld.count):
                self.register(seq.block_ids[i], seq.block_hashes[i])
                if self.computing.get(seq.block_hashes[i]) is seq:
                    del self.computing[seq.block_hashes[i]]
            computed = (ld.first + ld.count) * self.block_size
            if computed < seq.num_computed_tokens:
                if ld.counted:
                    self.disk_hit_blocks -= (seq.num_computed_tokens - computed) // self.block_size
                    seq.num_cached_tokens = min(seq.num_cached_tokens, computed)
                seq.num_computed_tokens = computed
        return done

    def spill(self, n: int) -> None:
        """Queue disk writes of the host tier's next blocks to drop (`HostTier.spill_candidates`)
        that the disk does not hold; their slots stay pinned until the write is done."""
        if self.disk is None:
            return
        for h, slot in self.host.spill_candidates(n):
            if self.disk.wants(h):
                self.disk.writing.add(h)
                self.host.pin(slot)
                self.spilling[h] = slot
                self.disk_jobs.append(("w", h, slot))

    def take_disk_jobs(self) -> list[tuple[str, int, int]]:
        jobs, self.disk_jobs = self.disk_jobs, []
        return jobs

    def disk_done(self, op: str, block_hash: int, slot: int, ok: bool) -> None:
        """The disk thread finished a job: a write frees its host slot (and may push files out);
        a read queues its block's copy-in, or cuts its sequence's load there."""
        if op == "w":
            self.host.unpin([self.spilling.pop(block_hash)])
            self.disk_jobs += [("d", h, -1) for h in self.disk.wrote(block_hash, ok)]
            return
        seq, i = self.reads.pop(slot)
        ld = self.loading[seq]
        ld.reads_left -= 1
        if self.disk.read_done(block_hash, ok):
            self.disk_jobs.append(("d", block_hash, -1))
        if not ok:
            ld.count = min(ld.count, i - ld.first)
        if ok and i < ld.first + ld.count:
            ld.batch = max(ld.batch, self.host.onload(slot, seq.block_ids[i]))
        else:
            self.host.unpin([slot])

    def write_ahead(self, n: int) -> None:
        """Copy out the cached blocks among the `n` coldest free ones (the next to be evicted)
        that the host tier does not hold yet, so their eviction costs no copy on the step's path."""
        if self.host is not None:
            for b in islice(self.pool.free, n):
                h = self.pool.hash_of[b]
                if h is not None:
                    self.host.write_ahead(b, h)

    def count_hits(self, seq: Sequence, gpu_blocks: int, host_blocks: int, disk_blocks: int) -> None:
        """A sequence's prefix hits at its first admission, per tier (the job summary's); disk hits
        that fail their reads are taken back when the sequence lands."""
        self.gpu_hit_blocks += gpu_blocks
        self.host_hit_blocks += host_blocks
        self.disk_hit_blocks += disk_blocks
        if seq in self.loading:
            self.loading[seq].counted = True

    def admit_failed(self, host_slots: list[int], disk_hashes: list[int] = ()) -> None:
        """The sequence matched `host_slots` and `disk_hashes` but is not admitted now: let them go."""
        if host_slots:
            self.host.unpin(list(host_slots))
        for h in disk_hashes:
            self.disk.read_done(h, None)

    def reset_prefix_cache(self) -> None:
        """Evict every cached block that no sequence holds, through the usual eviction path (vLLM's
        reset_prefix_cache): the next prompts are computed again."""
        self.pool.unref(self.allocate(self.pool.num_free))

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for the sequence's first `num_tokens` tokens; False if too few are free."""
        need = self.blocks_for(num_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.block_ids += self.allocate(need)
        return True

    def cache_computed(self, seq: Sequence, before: int) -> None:
        """The sequence has computed tokens past `before`: make its newly full blocks findable."""
        full = seq.num_computed_tokens // self.block_size
        if full > len(seq.block_hashes):
            self.extend_hashes(seq)
        for i in range(before // self.block_size, min(full, len(seq.block_hashes))):
            self.register(seq.block_ids[i], seq.block_hashes[i])
            if self.computing.get(seq.block_hashes[i]) is seq:
                del self.computing[seq.block_hashes[i]]

    def reserve(self, num_tokens: int) -> list[int] | None:
        """Blocks for the KV of `num_tokens` tokens that arrive from elsewhere (another worker's
        handoff); None if they are not free now (the caller asks again later)."""
        need = self.blocks_for(num_tokens)
        return self.allocate(need) if need <= self.pool.num_free else None

    def pin_cached(self, hashes: list[int]) -> list[int]:
        """Blocks of the leading run of `hashes` that the prefix cache holds, referenced so that no
        eviction takes them (another worker is reading them: a pull); `unpin` lets them go."""
        blocks = self.pool.match_prefix(hashes)
        self.pool.touch(blocks)
        return blocks

    def pin_host(self, hashes: list[int]) -> list[int]:
        """Host slots of the leading run of `hashes` that the host tier holds (copied out), pinned
        for a pull that reads them; `unpin_host` lets them go. [] without a host tier."""
        return self.host.pin_settled(hashes) if self.host is not None else []

    def unpin_host(self, slots: list[int]) -> None:
        if slots:
            self.host.unpin(slots)

    def unpin(self, block_ids: list[int], cold: bool = False) -> None:
        """Drop the references of `pin_cached` (or of unused reserved blocks). With `cold`, those
        left unreferenced become the next to evict (a pulled prefix's copy that the puller now
        holds), the prompt's tail first; else the most recent, as any freed block."""
        self.pool.unref(block_ids[::-1])
        if cold:
            for b in block_ids:
                if self.pool.ref_counts[b] == 0:
                    self.pool.free.move_to_end(b, last=False)

    def adopt_blocks(self, hashes: list[int], block_ids: list[int]) -> None:
        """Reserved blocks into which another worker's cached blocks `hashes` landed: make them
        findable and let them go (cached, free), as if computed here. A hash this cache already
        holds keeps its block; the landed copy is then plain free memory."""
        for block_id, block_hash in zip(block_ids, hashes, strict=True):
            self.register(block_id, block_hash)
        self.unpin(block_ids)

    def adopt(self, seq: Sequence) -> None:
        """A sequence whose computed tokens' KV landed in its reserved blocks: register them."""
        assert seq.block_ids
        self.cache_computed(seq, 0)

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give `child` the KV of `parent`'s computed prompt: its full blocks shared (one more
        reference each), its partly filled last block in a fresh block of the child's own. Returns
        the (source, destination) block copy the runner must make, or None when the prompt ends
        on a block boundary. Call only when `can_fork(parent)`.

        NOTE: copy-on-write degenerates to copy-at-fork here: every sample writes its next token
        into the partly filled block on its next step, so each would copy it then anyway."""
        assert not child.block_ids and parent.num_computed_tokens == parent.num_prompt_tokens
        full, partial = divmod(parent.num_prompt_tokens, self.block_size)
        shared = parent.block_ids[:full]
        self.pool.touch(shared)
        child.block_ids = list(shared)
        child.block_hashes = parent.block_hashes[:full]
        child.num_computed_tokens = parent.num_prompt_tokens
        if not partial:
            return None
        (dst,) = self.allocate(1)
        child.block_ids.append(dst)
        return parent.block_ids[full], dst

    def can_fork(self, parent: Sequence) -> bool:
        """A free block for a fork's copy of the partly filled last block, if it needs one."""
        return parent.num_prompt_tokens % self.block_size == 0 or self.pool.num_free > 0

    def free(self, seq: Sequence) -> None:
        """Give a sequence's blocks back, tail first (see BlockPool.unref); the blocks it was still
        to compute are no longer in the making."""
        assert seq not in self.loading, "a loading sequence keeps its blocks until they land"
        for h in seq.block_hashes[seq.num_computed_tokens // self.block_size :]:
            if self.computing.get(h) is seq:
                del self.computing[h]
        self.pool.unref(seq.block_ids[::-1])
        seq.block_ids = []
