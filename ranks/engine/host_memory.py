"""HostKVMemory: the host memory of a worker's host KV tier, and the copy stream between it and the KV cache.

The slots (ranks/engine/host_tier.py hands them out) live in chunks of CHUNK_BYTES, each allocated
the first time one of its slots is written, pinned on CUDA: pinning 32 GiB at once took 19 s on an
H200 node, so start-up pays nothing and a run pays per chunk as the tier fills.

The copies of one batch (HostTier.take_batch) run on a side stream, copy-outs then copy-ins, and an
event marks the batch's end. The engine polls `completed()` (a sequence whose blocks come in waits
in the scheduler until then, while others step) and calls `order_before_write(batch)` before the
compute stream writes a block whose copy-out is in that batch: a wait on the GPU, never on the host.

NOTE (ordering): the copy stream first waits for the compute stream's work issued so far, so a
copy-out reads the block's final bytes and a copy-in lands after the previous owner's last write.
On the CPU the copies run at once, in issue order, and every batch is complete when issued: the
engine's state machine is the same code, its waits are no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvrelay.kernels.kv_pack import pack_blocks, packed_shape, unpack_blocks
from kvrelay.ranks.engine.host_tier import CopyBatch
from kvrelay.ranks.engine.model import KVCache

CHUNK_BYTES = 256 << 20


@dataclass
class CopyStats:
    out_bytes: int = 0
    out_s: float = 0.0  # copy stream time of the copy-outs (CUDA events; 0 on the CPU)
    in_bytes: int = 0
    in_s: float = 0.0


class HostKVMemory:
    def __init__(self, kv_caches: list[KVCache], num_slots: int) -> None:
        k0 = kv_caches[0][0]
        self.kv_caches = kv_caches
        self.block_shape = packed_shape(kv_caches, 1)[1:]  # [layers, 2, block_size, kv_heads, head_dim]
        self.block_bytes = k0[0].numel() * 2 * len(kv_caches) * k0.element_size()
        self.dtype = k0.dtype
        self.device = k0.device
        self.pin = k0.is_cuda
        self.num_slots = num_slots
        self.chunk_slots = max(1, CHUNK_BYTES // self.block_bytes)
        # [chunk_slots, layers, 2, block_size, kv_heads, head_dim] cache dtype, host (pinned on CUDA)
        self.chunks: list[torch.Tensor | None] = [None] * -(-num_slots // self.chunk_slots)
        self.stream = torch.cuda.Stream(self.device) if self.pin else None
        # Batches in flight on the copy stream, oldest first: (number, start, after copy-outs, end, bytes out, in).
        self.in_flight: list[tuple[int, torch.cuda.Event, torch.cuda.Event, torch.cuda.Event, int, int]] = []
        self.issued = -1
        self.stats = CopyStats()

    def slot(self, s: int) -> torch.Tensor:  # [layers, 2, block_size, kv_heads, head_dim] host
        c, i = divmod(s, self.chunk_slots)
        if self.chunks[c] is None:
            n = min(self.chunk_slots, self.num_slots - c * self.chunk_slots)
            self.chunks[c] = torch.empty((n, *self.block_shape), dtype=self.dtype, pin_memory=self.pin)
        return self.chunks[c][i]

    def slot_bytes(self, s: int) -> np.ndarray:  # [block_bytes] uint8, the slot's memory (for the disk thread)
        return self.slot(s).view(torch.uint8).reshape(-1).numpy()

    def issue(self, batch: CopyBatch) -> None:
        """Start a batch's copies (on the CPU: run them)."""
        self.issued = batch.number
        if self.stream is None:
            self._copy(batch)
            self.stats.out_bytes += len(batch.out) * self.block_bytes
            self.stats.in_bytes += len(batch.inn) * self.block_bytes
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        with torch.cuda.stream(self.stream):
            marks[0].record()
            self._copy(batch, marks[1])
            marks[2].record()
        self.in_flight.append((batch.number, *marks, len(batch.out) * self.block_bytes, len(batch.inn) * self.block_bytes))

    def _copy(self, batch: CopyBatch, between: torch.cuda.Event | None = None) -> None:
        if batch.out:
            ids, slots = zip(*batch.out)
            buf = pack_blocks(self.kv_caches, list(ids))  # [n, layers, 2, block_size, kv_heads, head_dim] device
            for i, s in enumerate(slots):
                self.slot(s).copy_(buf[i], non_blocking=self.pin)
        if between is not None:
            between.record()
        if batch.inn:
            slots, ids = zip(*batch.inn)
            buf = torch.empty((len(slots), *self.block_shape), dtype=self.dtype, device=self.device)
            for i, s in enumerate(slots):
                buf[i].copy_(self.slot(s), non_blocking=self.pin)
            unpack_blocks(buf, self.kv_caches, list(ids))

    def completed(self) -> int:
        """The last batch such that it and every earlier one have completed."""
        while self.in_flight and self.in_flight[0][3].query():
            _, start, mid, end, out_bytes, in_bytes = self.in_flight.pop(0)
            self.stats.out_bytes += out_bytes
            self.stats.out_s += start.elapsed_time(mid) / 1e3
            self.stats.in_bytes += in_bytes
            self.stats.in_s += mid.elapsed_time(end) / 1e3
        return self.in_flight[0][0] - 1 if self.in_flight else self.issued

    def order_before_write(self, batch: int) -> None:
        """The compute stream's next work runs after batch `batch` (a GPU-side wait)."""
        for number, *marks, _, _ in self.in_flight:
            if number >= batch:
                torch.cuda.current_stream(self.device).wait_event(marks[2])
                return

    def wait(self, batch: int) -> None:
        """Block the host until batch `batch` completed (when the engine has nothing else to run)."""
        for number, *marks, _, _ in self.in_flight:
            if number >= batch:
                marks[2].synchronize()
                return
