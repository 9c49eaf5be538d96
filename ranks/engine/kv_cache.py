"""KVCacheManager: which blocks hold which sequence's KV (no torch here; vLLM v1's split).

The scheduler decides what runs; this manager keeps the blocks: it hashes a sequence's full
blocks, matches its prefix against the cache, allocates (evicting cold cached blocks), registers
computed blocks, reserves blocks for KV that another worker sends, and frees a sequence's blocks.
The BlockPool below it is plain bookkeeping; every moment that someone outside may care about
passes through here:

    on_cache(block_hash)           a block became findable (the worker's window adds it)
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
`match_host` extends a GPU prefix match into it, and `admit` queues the copy-in of those blocks
into the sequence's first fresh blocks and registers them at once: the engine issues the copies
before the step's forward, on the same stream, so any reader of the block runs after its bytes land.
"""

from __future__ import annotations

from collections.abc import Callable

from kvrelay.core.block_hash import block_hashes, num_blocks
from kvrelay.ranks.engine.block_pool import BlockPool
from kvrelay.ranks.engine.host_tier import HostTier
from kvrelay.ranks.engine.sequence import Sequence

EvictHook = Callable[[int, int], None]  # (block id, block hash), before the block is reused
CacheHook = Callable[[int], None]  # (block hash), once the block is findable


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, hash_seed: int, enable_caching: bool = True,
                 host: HostTier | None = None) -> None:
        self.pool = BlockPool(num_blocks, block_size, enable_caching)
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.host = host if enable_caching else None
        self.gpu_hit_blocks = 0  # prefix hits at first admission, per tier (`count_hits`)
        self.host_hit_blocks = 0
        self.on_cache: CacheHook | None = None
        self.on_evict: EvictHook | None = None
        self.computing: dict[int, Sequence] = {}  # block hash -> the admitted sequence computing it

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

    # --- blocks -------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """`n` free blocks, coldest first; cached blocks among them are evicted through `on_evict`."""
        blocks, evicted = self.pool.take(n)
        for block_id, block_hash in evicted:
            if self.host is not None:
                self.host.offload(block_id, block_hash)
            if self.on_evict is not None:
                self.on_evict(block_id, block_hash)
        return blocks

    def register(self, block_id: int, block_hash: int) -> None:
        if self.pool.register(block_id, block_hash) and self.on_cache is not None:
            self.on_cache(block_hash)

    def admit(self, seq: Sequence, hits: list[int], num_tokens: int, host_slots: list[int] = ()) -> bool:
        """Give a new sequence the cache hits `hits` and fresh blocks up to `num_tokens` tokens,
        the first of them filled from `host_slots` (from `match_host`); False (nothing taken, the
        slots unpinned) if the free blocks do not cover them."""
        assert not seq.block_ids
        need = self.blocks_for(num_tokens) - len(hits)
        if need > self.pool.num_free_after_touch(hits):
            self.admit_failed(host_slots)
            return False
        assert len(host_slots) <= need
        self.pool.touch(hits)
        fresh = self.allocate(need)
        seq.block_ids = hits + fresh
        for i, (slot, block_id) in enumerate(zip(host_slots, fresh)):
            self.host.onload(slot, block_id)
            self.register(block_id, seq.block_hashes[len(hits) + i])
        if self.pool.enable_caching:
            for h in seq.block_hashes[len(hits) + len(host_slots) :]:
                self.computing.setdefault(h, seq)  # the first to compute a block keeps it (as BlockPool.register)
        return True

    def count_hits(self, gpu_blocks: int, host_blocks: int) -> None:
        """A sequence's prefix hits at its first admission, per tier (the job summary's)."""
        self.gpu_hit_blocks += gpu_blocks
        self.host_hit_blocks += host_blocks

    def admit_failed(self, host_slots: list[int]) -> None:
        """The sequence matched `host_slots` but is not admitted now: unpin them."""
        if host_slots:
            self.host.unpin(list(host_slots))

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
        for h in seq.block_hashes[seq.num_computed_tokens // self.block_size :]:
            if self.computing.get(h) is seq:
                del self.computing[h]
        self.pool.unref(seq.block_ids[::-1])
        seq.block_ids = []
