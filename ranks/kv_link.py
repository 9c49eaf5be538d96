"""How one chunk of a handoff's KV moves between two workers (ranks/handoff.py decides when).

    link = PairLink(engine, transport, rank)            # one rank to one rank (tp=1 on both sides)
    link = GroupLink(engine, transport, rank, tp, tp_of, num_kv_heads, sync)   # tensor-parallel groups
    sending = link.send(request_id, first, count, dest)  # Pending: this rank's part has left
    sending = link.send_blocks(block_ids, dest)          # cache blocks by id: a pull's (ranks/pulls.py)
    sending = link.send_packed(buf, dest)                # packed by the caller (PairLink: a pull from a host tier)
    receiving = link.recv(count, src)                    # Receiving: done(), then unpack(block_ids)

Ranks are world ranks of the workers' leaders (the router is rank 0); the transport's communicator
is the world without the router, so a rank's transport peer is its world rank - 1. Every piece goes
with the receiving rank's world rank as its tag (ranks/transport.py: one tag per pair direction).

Between groups, `sharding.regroup_kv` says which rank sends which KV heads to which: shard i to
shard i for equal tp, head ranges otherwise. The leader moves its own pieces and tells its other
ranks theirs (StepSync: SendKV; RecvKV, then UnpackKV once its own part is in), so each rank sends
and receives only its own shard, in parallel with the others. A follower waits for its receives
at the UnpackKV, before any later step of the group can read the blocks.

NOTE: the handoff's staging budget counts the leader's bytes, the same on every rank of a group
but where KV heads are replicated: a rank whose heads go to several replicas stages them once per
replica (at most dst_tp / num_kv_heads times its share).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from kvrelay.ranks.engine.sharding import regroup_kv
from kvrelay.ranks.engine.step_sync import KVPiece, RecvKV, SendKV, StepSync, UnpackKV
from kvrelay.ranks.transport import KVTransport, Pending


class Receiving(Protocol):
    def done(self) -> bool:
        """True once this rank's part of the chunk has arrived."""

    def unpack(self, block_ids: list[int]) -> None:
        """Write the chunk into the reserved `block_ids` (after done())."""


class LinkEngine(Protocol):
    """The part of ranks/engine/engine.py's Engine that moves packed KV."""

    def pack_kv(self, request_id: str, first: int, count: int, heads: tuple[int, int] | None = None) -> torch.Tensor: ...
    def pack_blocks(self, block_ids: list[int], heads: tuple[int, int] | None = None) -> torch.Tensor: ...
    def pack_served(self, block_ids: list[int], slots: list[int]) -> torch.Tensor: ...
    def handoff_blocks(self, request_id: str, first: int, count: int) -> list[int]: ...
    def staging_buffer(self, n: int, num_heads: int | None = None) -> torch.Tensor: ...
    def unpack_kv(self, buf: torch.Tensor, block_ids: list[int], first_head: int = 0) -> None: ...


class AllOf:
    """Several transfers as one Pending."""

    def __init__(self, pending: list[Pending]) -> None:
        self.pending = pending

    def done(self) -> bool:
        self.pending = [p for p in self.pending if not p.done()]
        return not self.pending

    def wait(self) -> None:
        for p in self.pending:
            p.wait()
        self.pending = []


class _Received:
    """This rank's receives of one chunk: (pending, buffer, first KV head to write) each."""

    def __init__(self, engine: LinkEngine, parts: list[tuple[Pending, torch.Tensor, int]], after: Callable[[list[int]], None] | None = None):
        self.engine, self.parts, self.after = engine, parts, after

    def done(self) -> bool:
        return all(p.done() for p, _, _ in self.parts)

    def unpack(self, block_ids: list[int]) -> None:
        for _, buf, first_head in self.parts:
            self.engine.unpack_kv(buf, block_ids, first_head)
        self.parts = []
        if self.after is not None:
            self.after(block_ids)


class PairLink:
    """One rank to one rank: the whole packed chunk in one transfer."""

    def __init__(self, engine: LinkEngine, transport: KVTransport, rank: int) -> None:
        self.engine, self.transport, self.rank = engine, transport, rank

    def send(self, request_id: str, first: int, count: int, dest: int) -> Pending:
        return self.transport.send(self.engine.pack_kv(request_id, first, count), dest - 1, dest)

    def send_blocks(self, block_ids: list[int], dest: int) -> Pending:
        """Cache blocks named by id (a pull's cached blocks, ranks/pulls.py)."""
        return self.transport.send(self.engine.pack_blocks(block_ids), dest - 1, dest)

    def send_packed(self, buf: torch.Tensor, dest: int) -> Pending:
        """A chunk packed by the caller (a pull's blocks from the source's host tier)."""
        return self.transport.send(buf, dest - 1, dest)

    def recv(self, count: int, src: int) -> Receiving:
        buf = self.engine.staging_buffer(count)
        return _Received(self.engine, [(self.transport.recv(buf, src - 1, self.rank), buf, 0)])


class GroupLink:
    """The leader's side of a handoff where either worker is a tensor-parallel group (the other may
    be one rank). `tp_of(leader)` is the tp of the worker that `leader` leads; `sync` is None for a
    worker of one rank."""

    def __init__(self, engine: LinkEngine, transport: KVTransport, rank: int, tp: int, tp_of: Callable[[int], int],
                 num_kv_heads: int, sync: StepSync | None) -> None:
        assert (sync is None) == (tp == 1)
        self.engine, self.transport, self.rank, self.tp = engine, transport, rank, tp
        self.tp_of, self.num_kv_heads, self.sync = tp_of, num_kv_heads, sync
        self.next_key = 0

    def send(self, request_id: str, first: int, count: int, dest: int) -> Pending:
        return self.send_blocks(self.engine.handoff_blocks(request_id, first, count), dest)

    def send_blocks(self, block_ids: list[int], dest: int) -> Pending:
        pieces = [KVPiece(m.src, dest + m.dst - 1, dest + m.dst, m.src_offset, m.heads[1] - m.heads[0])
                  for m in regroup_kv(self.num_kv_heads, self.tp, self.tp_of(dest))]
        theirs = [p for p in pieces if p.rank != 0]
        if theirs:
            self.sync.publish(SendKV(block_ids, theirs))
        return AllOf([self.transport.send(self.engine.pack_blocks(block_ids, (p.first_head, p.num_heads)), p.peer, p.tag)
                      for p in pieces if p.rank == 0])

    def send_packed(self, buf: torch.Tensor, dest: int) -> Pending:
        raise RuntimeError("a chunk packed in one buffer (a pull from a host tier) moves between single ranks only; "
                           "Layout.pulls_from_host is off where a worker is a tensor-parallel group")

    def recv(self, count: int, src: int) -> Receiving:
        pieces = [KVPiece(m.dst, src + m.src - 1, self.rank + m.dst, m.dst_offset, m.heads[1] - m.heads[0])
                  for m in regroup_kv(self.num_kv_heads, self.tp_of(src), self.tp)]
        theirs = [p for p in pieces if p.rank != 0]
        key, self.next_key = self.next_key, self.next_key + 1
        if theirs:
            self.sync.publish(RecvKV(key, count, theirs))
        parts = []
        for p in pieces:
            if p.rank == 0:
                buf = self.engine.staging_buffer(count, p.num_heads)
                parts.append((self.transport.recv(buf, p.peer, p.tag), buf, p.first_head))
        assert parts, "regroup_kv gives the leader's first KV head to the leader"
        # The followers unpack after the leader: its unpack first issues the host tier's queued
        # copies (Engine.unpack_kv), which the followers must also run before these blocks change.
        return _Received(self.engine, parts, (lambda blocks: self.sync.publish(UnpackKV(key, blocks))) if theirs else None)
