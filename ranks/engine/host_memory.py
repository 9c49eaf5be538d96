"""HostKVMemory: the host memory of a worker's host KV tier, and the copies between it and the KV cache.

The slots (ranks/engine/host_tier.py hands them out) live in chunks of CHUNK_BYTES, each allocated
the first time one of its slots is written, pinned on CUDA: pinning 32 GiB at once took 19 s on an
H200 node, so start-up pays nothing and a run pays per chunk as the tier fills.

NOTE: the copies run on the current stream, in the order the engine issues them (copy-outs, then
copy-ins, then the step's forward). The evicted block's copy-out is thus ordered before whatever
overwrites the block (an onload into it, the forward, a handoff's unpack) without a host sync, and
a copy-in before the forward that reads it. A side stream would let copy-outs overlap the forward,
but the block's next writer must then wait on an event; that is the next step (issue 15), not this one.
"""

from __future__ import annotations

import torch

from kvrelay.kernels.kv_pack import pack_blocks, packed_shape, unpack_blocks
from kvrelay.ranks.engine.model import KVCache

CHUNK_BYTES = 256 << 20


class HostKVMemory:
    def __init__(self, kv_caches: list[KVCache], num_slots: int) -> None:
        k0 = kv_caches[0][0]
        self.block_shape = packed_shape(kv_caches, 1)[1:]  # [layers, 2, block_size, kv_heads, head_dim]
        self.block_bytes = k0[0].numel() * 2 * len(kv_caches) * k0.element_size()
        self.dtype = k0.dtype
        self.pin = k0.is_cuda
        self.num_slots = num_slots
        self.chunk_slots = max(1, CHUNK_BYTES // self.block_bytes)
        # [chunk_slots, layers, 2, block_size, kv_heads, head_dim] cache dtype, host (pinned on CUDA)
        self.chunks: list[torch.Tensor | None] = [None] * -(-num_slots // self.chunk_slots)

    def slot(self, s: int) -> torch.Tensor:  # [layers, 2, block_size, kv_heads, head_dim] host
        c, i = divmod(s, self.chunk_slots)
        if self.chunks[c] is None:
            n = min(self.chunk_slots, self.num_slots - c * self.chunk_slots)
            self.chunks[c] = torch.empty((n, *self.block_shape), dtype=self.dtype, pin_memory=self.pin)
        return self.chunks[c][i]

    def copy_out(self, kv_caches: list[KVCache], block_ids: list[int], slots: list[int]) -> None:
        """Blocks `block_ids` of the cache -> host `slots`: one gather on the device, then one copy per block."""
        buf = pack_blocks(kv_caches, block_ids)  # [n, layers, 2, block_size, kv_heads, head_dim] on the cache's device
        for i, s in enumerate(slots):
            self.slot(s).copy_(buf[i], non_blocking=self.pin)

    def copy_in(self, kv_caches: list[KVCache], slots: list[int], block_ids: list[int]) -> None:
        """Host `slots` -> blocks `block_ids`: one copy per block into a device buffer, then one scatter."""
        buf = torch.empty((len(slots), *self.block_shape), dtype=self.dtype, device=kv_caches[0][0].device)
        for i, s in enumerate(slots):
            buf[i].copy_(self.slot(s), non_blocking=self.pin)
        unpack_blocks(buf, kv_caches, block_ids)
