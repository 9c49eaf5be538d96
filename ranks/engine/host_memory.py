"""HostKVMemory: the host memory of a worker's host KV tier, and the copy stream between it and the KV cache.

The slots (ranks/engine/host_tier.py hands them out) live in chunks of CHUNK_BYTES, each allocated
the first time one of its slots is written, pinned on CUDA: pinning 32 GiB at once took 19 s on an
H200 node, so start-up pays nothing and a run pays per chunk as the tier fills.

The copies of one batch (HostTier.take_batch) run on a side stream, copy-outs then copy-ins (one
gather or scatter kernel on the device side, one copy per run of consecutive host slots), and an
event marks the batch's end. The engine polls `completed()` (a sequence whose blocks come in waits
in the scheduler until then, while others step) and calls `order_before_write(batch)` before the
compute stream writes a block whose copy-out is in that batch: a wait on the GPU, never on the host.

Under tensor parallelism each rank of the group has its own copy stream, and the leader decides
from its own (ranks/engine/group_tiers.py): another rank orders its compute stream by the blocks
a step uses (`order_before_use`), since its copies may finish later than the leader's.

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


@dataclass
class InFlight:
    """A batch on the copy stream: its events (start, after the copy-outs, end) and what it moves."""

    number: int
    marks: list[torch.cuda.Event]
    out_blocks: np.ndarray  # [n] int64 block ids
    in_blocks: np.ndarray


def last_conflict(batches: list[tuple[int, np.ndarray, np.ndarray]], read: np.ndarray, written: np.ndarray) -> int:
    """The last of `batches` (number, blocks copied out, blocks copied in) that copies out a block
    in `written` or into a block in `read` or `written`: the compute stream must follow it. -1: none.
    (Vectorized: a decode step's block tables are tens of thousands of ids.)"""
    for number, out, inn in reversed(batches):
        if np.isin(written, out).any() or np.isin(read, inn).any() or np.isin(written, inn).any():
            return number
    return -1


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
        self.in_flight: list[InFlight] = []  # oldest first
        self.issued = -1
        self.settled = -1  # what `completed` last returned
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
        self.in_flight.append(InFlight(batch.number, marks, np.array([b for b, _ in batch.out], np.int64),
                                       np.array([b for _, b in batch.inn], np.int64)))

    def _copy(self, batch: CopyBatch, between: torch.cuda.Event | None = None) -> None:
        # In slot order: a sequence frees its blocks tail first, so its prefix leaves (and lands in
        # the host slots) backwards; sorted, a prefix's slots are one run, and one copy.
        if batch.out:
            ids, slots = zip(*sorted(batch.out, key=lambda p: p[1]))
            buf = pack_blocks(self.kv_caches, list(ids))  # [n, layers, 2, block_size, kv_heads, head_dim] device
            for i, j, host in self._spans(slots):
                host.copy_(buf[i:j], non_blocking=self.pin)
        if between is not None:
            between.record()
        if batch.inn:
            slots, ids = zip(*sorted(batch.inn))
            buf = torch.empty((len(slots), *self.block_shape), dtype=self.dtype, device=self.device)
            for i, j, host in self._spans(slots):
                buf[i:j].copy_(host, non_blocking=self.pin)
            unpack_blocks(buf, self.kv_caches, list(ids))

    def gather(self, slots: list[int], out: torch.Tensor) -> None:
        """Copy host `slots` into `out` ([n, layers, 2, block_size, kv_heads, head_dim], device) on
        the current stream (a pull's chunk: the send that follows on the transport waits for it).
        The slots must stay pinned until that send completes."""
        for i, j, host in self._spans(tuple(slots)):
            out[i:j].copy_(host, non_blocking=self.pin)

    def _spans(self, slots: tuple[int, ...]):
        """(i, j, host view of slots[i:j]) for each run of consecutive slots in one chunk: one copy
        per run, not per block (a prefix's blocks go out together and so mostly sit side by side)."""
        i = 0
        while i < len(slots):
            c, first = divmod(slots[i], self.chunk_slots)
            self.slot(slots[i])  # allocates the chunk
            j = i + 1
            while j < len(slots) and slots[j] == slots[j - 1] + 1 and slots[j] // self.chunk_slots == c:
                j += 1
            yield i, j, self.chunks[c][first : first + j - i]
            i = j

    def completed(self) -> int:
        """The last batch such that it and every earlier one have completed."""
        while self.in_flight and self.in_flight[0].marks[2].query():
            b = self.in_flight.pop(0)
            start, mid, end = b.marks
            self.stats.out_bytes += len(b.out_blocks) * self.block_bytes
            self.stats.out_s += start.elapsed_time(mid) / 1e3
            self.stats.in_bytes += len(b.in_blocks) * self.block_bytes
            self.stats.in_s += mid.elapsed_time(end) / 1e3
        self.settled = self.in_flight[0].number - 1 if self.in_flight else self.issued
        return self.settled

    def _end_of(self, batch: int) -> torch.cuda.Event | None:
        """The end event of the last batch in flight up to `batch` (None: all of them completed)."""
        ends = [b.marks[2] for b in self.in_flight if b.number <= batch]
        return ends[-1] if ends else None

    def order_before_write(self, batch: int) -> None:
        """The compute stream's next work runs after batch `batch` (a GPU-side wait)."""
        if (end := self._end_of(batch)) is not None:
            torch.cuda.current_stream(self.device).wait_event(end)

    def order_before_use(self, read: np.ndarray, written: np.ndarray) -> None:
        """The compute stream's next work, which reads blocks `read` and writes `written`, runs
        after the copies in flight that move them (a GPU-side wait; nothing on the CPU)."""
        if self.in_flight:
            self.completed()
            self.order_before_write(last_conflict([(b.number, b.out_blocks, b.in_blocks) for b in self.in_flight],
                                                  read, written))

    def wait(self, batch: int) -> None:
        """Block the host until batch `batch` completed (when the engine has nothing else to run)."""
        if (end := self._end_of(batch)) is not None:
            end.synchronize()
