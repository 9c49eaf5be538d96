"""BlockPool: the KV-cache blocks of one worker, with automatic prefix caching.

A block is either referenced by running sequences (ref count > 0) or free. A free block that
holds a full, hashed block of tokens stays findable by its hash until it is reused: free blocks
form one LRU queue and allocation takes from its cold end, evicting the hash it held. So
"cached" and "free" overlap, as in vLLM's v1 block pool: cache hits are free to take, and memory
is never held back for the cache.

Listeners (`on_cache`, `on_evict`) see every hash that becomes findable or stops being findable;
the worker's MPI window mirrors the table through them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable


class BlockPool:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        on_cache: Callable[[int], None] | None = None,
        on_evict: Callable[[int], None] | None = None,
    ) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.on_cache = on_cache
        self.on_evict = on_evict
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        # Unreferenced blocks, coldest first. OrderedDict gives O(1) removal of a cache hit.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

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

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self.free), f"allocate({n}) with {len(self.free)} free blocks"
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            self._forget(b)
            self.ref_counts[b] = 1
            out.append(b)
        return out

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference on each block. Pass a sequence's blocks tail first: the tail of a
        prompt is the least likely part to be shared, so it is evicted first."""
        for b in block_ids:
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0
            if self.ref_counts[b] == 0:
                self.free[b] = None

    def register(self, block_id: int, block_hash: int) -> None:
        """Make a full, computed block findable by its hash. A hash already held by another block
        (two sequences computed the same block at once) keeps its first block."""
        if not self.enable_caching or block_hash in self.cached:
            return
        assert self.hash_of[block_id] is None
        self.cached[block_hash] = block_id
        self.hash_of[block_id] = block_hash
        if self.on_cache is not None:
            self.on_cache(block_hash)

    def _forget(self, b: int) -> None:
        h = self.hash_of[b]
        if h is None:
            return
        self.hash_of[b] = None
        del self.cached[h]
        if self.on_evict is not None:
            self.on_evict(h)
