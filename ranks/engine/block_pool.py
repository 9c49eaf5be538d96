"""BlockPool: the KV-cache blocks of one worker as ints: reference counts, an LRU of free blocks,
and the table of hashes that make a block findable (automatic prefix caching).

A block is either referenced by sequences (ref count > 0) or free. A free block that holds a
full, hashed block of tokens stays findable by its hash until it is taken again: free blocks form
one LRU queue and `take` hands out its cold end, dropping the hashes those blocks held. So
"cached" and "free" overlap, as in vLLM's v1 block pool: cache hits are free to take, and memory
is never held back for the cache. The pool tells nobody: ranks/engine/kv_cache.py owns the
moments (cache, evict) and the listeners.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        # Unreferenced blocks, coldest first. OrderedDict gives O(1) removal of a cache hit.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def cached_hashes(self) -> set[int]:
        return set(self.cached)

    def match_prefix(self, hashes: Iterable[int]) -> list[int]:
        """Block ids holding the longest prefix of `hashes` (no references taken)."""
        if not self.enable_caching:
            return []
        out = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def num_free_after_touch(self, block_ids: Iterable[int]) -> int:
        """Free blocks left once `block_ids` (cache hits) are referenced."""
        return len(self.free) - sum(1 for b in block_ids if self.ref_counts[b] == 0)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cache hits."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1

    def take(self, n: int) -> tuple[list[int], list[tuple[int, int]]]:
        """The `n` coldest free blocks, referenced once, and the (block id, hash) pairs that stopped
        being findable because their block was taken (the evictions)."""
        assert n <= len(self.free), f"take({n}) with {len(self.free)} free blocks"
        out, evicted = [], []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.hash_of[b]
            if h is not None:
                self.hash_of[b] = None
                del self.cached[h]
                evicted.append((b, h))
            self.ref_counts[b] = 1
            out.append(b)
        return out, evicted

    def unref(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block. Pass a sequence's blocks tail first: the tail of a
        prompt is the least likely part to be shared, so it becomes the coldest."""
        for b in block_ids:
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0
            if self.ref_counts[b] == 0:
                self.free[b] = None

    def register(self, block_id: int, block_hash: int) -> bool:
        """Make a full, computed block findable by its hash; False when caching is off or another
        block holds the hash already (two sequences computed the same block at once: the first stays)."""
        if not self.enable_caching or block_hash in self.cached:
            return False
        assert self.hash_of[block_id] is None
        self.cached[block_hash] = block_id
        self.hash_of[block_id] = block_hash
        return True
