"""Handoffs: a worker's KV transfers to and from other workers, and the staging budget they share.

Protocol, per request (prefill P -> decode D):
  P's engine stops the request after its first token; `start` sends HANDOFF (the SeqState: the
  prompt once, the tokens so far, sampler state) to D. D queues it (`announced`) until it can
  reserve the blocks, then moves its KV in chunks of whole blocks: for each chunk, once the chunk
  fits in D's staging room, D posts its receive and answers READY(xfer, first block, blocks). P
  queues each READY (`ready`) until the chunk fits in its own staging room, then packs those
  blocks and sends them. When the last chunk's send completes P frees the blocks; each chunk D
  receives is unpacked into its reserved blocks at once, and after the last one the engine starts
  decoding the request (`incoming` -> engine).

Chunks: at most `chunk_blocks` blocks, min(MAX_CHUNK_BLOCKS, what the budget holds). A prompt's KV
may be many times the budget (87k tokens of the 8B shape are 10.6 GiB): it goes through a buffer
of at most the budget, chunk after chunk, on both sides.

Ordering: transfers between a pair start in READY order on both sides, which NCCL needs (its
point-to-point operations match in posting order): D posts receives (all chunks of one transfer,
then the next transfer's, in HANDOFF order) and sends READY right after each, MPI delivers one
sender's READYs in order, P starts sends in READY order, and a later READY never overtakes an
earlier one waiting for room.

Staging budget: packed KV leaves and arrives in buffers outside the KV cache; sends and receives
together never stage more than `staging_budget` bytes, except that a single block larger than
the whole budget still goes when nothing else is staged (alone).

Pulls (ranks/pulls.py) use the same machinery for another kind of transfer: a worker's cached
blocks, pinned, to a worker that asked for them (`serve` on the source, `receive_first` and
`confirm`, or `expect`, on the receiver); only what happens after the last chunk differs (the
source unpins, the receiver registers the blocks by hash). They share the pair's READY order, tag
and staging budget with handoffs. A pull's first chunk needs no READY: the receiver posts its
receive before it asks, and the PULL stands for the READY in the pair's order (MPI delivers one
sender's control messages in order, whatever their tags).

The engine's KV surface, the transport and the outbox are injected (tests/test_handoff.py drives
this with fakes, without MPI). How a chunk's bytes move is the link's (ranks/kv_link.py): one
transfer between single ranks, or each rank's shard between tensor-parallel groups. A pull moves
cached blocks packed here, between single ranks only (tensor-parallel workers do not pull).

NOTE: one READY per chunk, rather than one READY carrying the whole chunk plan, keeps the no-
deadlock rule per chunk: a send starts only after its receive is posted, so staged sends always
drain, and a receive is posted only when its chunk fits in D's room, so D never stages more than
its budget while it waits for P. With a plan in one READY, D would have to post every chunk's
receive up front (staging the whole transfer), or P would send chunks whose receives are not
posted yet, holding its staging room on a send that waits for D. D picks the chunk's blocks and READY names
them, so P never needs D's chunk size. The cost is one small control message per chunk (128
blocks of the 8B shape are 256 MiB of KV).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch

from kvrelay.core.messages import Handoff, Message, Ready, SeqState
from kvrelay.ranks.kv_link import PairLink, Receiving
from kvrelay.ranks.transport import KVTransport, Pending

MAX_RECEIVING = 8  # chunk receives in flight per decode worker
MAX_CHUNK_BLOCKS = 128  # BENCHMARKS B4: 128-block chunks ran at 0.87 of plain NCCL, one transfer at 0.68


class KVEngine(Protocol):
    """The part of ranks/engine/engine.py's Engine that a handoff uses."""

    def kv_blocks(self, num_tokens: int) -> int: ...
    def kv_bytes(self, num_tokens: int) -> int: ...
    def reserve(self, num_tokens: int) -> list[int] | None: ...
    def pack_kv(self, request_id: str, first: int, count: int) -> torch.Tensor: ...
    def pack_served(self, block_ids: list[int], slots: list[int]) -> torch.Tensor: ...
    def staging_buffer(self, n: int) -> torch.Tensor: ...
    def unpack_kv(self, buf: torch.Tensor, block_ids: list[int], first_head: int = 0) -> None: ...
    def transfer_s(self, num_tokens: int) -> float: ...
    def free_kv(self, request_id: str) -> None: ...
    def add_received(self, state: SeqState, block_ids: list[int]) -> None: ...


class KVLink(Protocol):
    """How one chunk's bytes move (ranks/kv_link.py)."""

    def send(self, request_id: str, first: int, count: int, dest: int) -> Pending: ...
    def send_blocks(self, block_ids: list[int], dest: int) -> Pending: ...
    def send_packed(self, buf: torch.Tensor, dest: int) -> Pending: ...  # PairLink only
    def recv(self, count: int, src: int) -> Receiving: ...


class Sender(Protocol):
    def send(self, record: Message, dest: int) -> None: ...


@dataclass
class HandoffStats:
    handoffs_sent: int = 0
    handoffs_received: int = 0
    handoff_bytes: int = 0  # packed KV of the handoffs sent (pulls are counted in ranks/pulls.py)
    handoff_seconds: float = 0.0  # first chunk's send posted -> last chunk's send seen complete, summed
    chunks_sent: int = 0
    chunks_received: int = 0
    max_staged_bytes: int = 0


@dataclass
class _Chunk:
    first: int  # index of its first block among the transfer's blocks
    count: int  # blocks
    nbytes: int  # staged bytes (packed KV of `count` blocks)
    pending: Pending | Receiving | None = None  # receive side: unpacked once done
    not_before: float = 0.0  # clock time before which a simulated transfer is not done


@dataclass
class _Outgoing:
    dest: int
    num_blocks: int
    num_kv_tokens: int  # tokens whose KV it carries (a simulated transfer's time)
    send: Callable[[int, int, int], Pending]  # (first, count, dest) -> those blocks' send, posted
    release: Callable[[float], None]  # after the last chunk's send, with the transfer's seconds
    blocks_sent: int = 0
    sending: list[_Chunk] = field(default_factory=list)
    started: float | None = None
    busy_until: float = 0.0  # simulated: when its last posted chunk is done


@dataclass
class Incoming:
    src: int
    xfer: int
    num_kv_tokens: int
    num_blocks: int
    land: Callable[[list[int]], None]  # after the last chunk is unpacked, with the reserved blocks
    blocks: list[int] = field(default_factory=list)  # reserved; empty until then
    next_block: int = 0  # first block whose receive is not posted yet
    blocks_received: int = 0
    receiving: list[_Chunk] = field(default_factory=list)
    busy_until: float = 0.0


class Handoffs:
    def __init__(self, engine: KVEngine, transport: KVTransport, outbox: Sender, rank: int, staging_budget: int,
                 max_receiving: int = MAX_RECEIVING, clock: Callable[[], float] = time.perf_counter,
                 link: KVLink | None = None) -> None:
        self.engine = engine
        self.link = link or PairLink(engine, transport, rank)
        self.outbox = outbox
        self.rank = rank  # this worker's rank in the world (the router is rank 0)
        self.staging_budget = staging_budget
        self.block_bytes = engine.kv_bytes(1)  # packed KV of one block
        self.chunk_blocks = max(1, min(MAX_CHUNK_BLOCKS, staging_budget // max(self.block_bytes, 1)))
        self.max_receiving = max_receiving
        self.clock = clock
        self.stats = HandoffStats()
        self.next_xfer: dict[int, int] = {}  # decode rank -> next transfer number
        self.outgoing: dict[tuple[int, int], _Outgoing] = {}  # (receiver's rank, xfer) -> transfer announced
        self.ready: deque[tuple[_Outgoing, _Chunk]] = deque()  # READY received, send waiting for staging room
        self.announced: deque[Incoming] = deque()  # HANDOFF (or a pull's PULLED) received, chunks still to post
        self.incoming: list[Incoming] = []  # blocks reserved, chunks in flight
        self.receives = 0  # chunk receives in flight
        self.staged = 0  # bytes of packed KV held in staging buffers (sends and receives)

    def busy(self) -> bool:
        return bool(self.outgoing or self.announced or self.incoming or self.ready)

    # --- messages in and out --------------------------------------------------------------------

    def start(self, state: SeqState, dest: int) -> None:
        """Prefill side: announce a sequence's KV to the decode worker `dest`."""
        num_blocks = self.engine.kv_blocks(state.num_kv_tokens)
        xfer = self._outgoing(dest, state.num_kv_tokens, num_blocks, partial(self.link.send, state.request_id),
                              partial(self._handed_off, state.request_id, num_blocks))
        self.outbox.send(Handoff(xfer, state), dest)

    def serve(self, dest: int, block_ids: list[int], num_kv_tokens: int, release: Callable[[float], None],
              slots: list[int] = ()) -> int:
        """Source of a pull: send `block_ids`, then host tier `slots` (all pinned by the caller,
        who unpins them in `release`) to `dest` as it answers READY; returns the transfer number
        the caller tells `dest`. A chunk with host slots leaves packed by the engine, in one buffer
        (single ranks only: PairLink)."""
        g = len(block_ids)

        def send(first: int, count: int, dest: int) -> Pending:
            ids, host = block_ids[first : first + count], slots[max(first - g, 0) : max(first + count - g, 0)]
            if not host:
                return self.link.send_blocks(ids, dest)
            return self.link.send_packed(self.engine.pack_served(ids, list(host)), dest)

        return self._outgoing(dest, num_kv_tokens, g + len(slots), send, release)

    def on_handoff(self, src: int, msg: Handoff) -> None:
        """Decode side: a prefill worker announced a transfer."""
        tokens = msg.state.num_kv_tokens
        self.expect(src, msg.xfer, tokens, self.engine.kv_blocks(tokens), partial(self._received, msg.state))

    def expect(self, src: int, xfer: int, num_kv_tokens: int, num_blocks: int, land: Callable[[list[int]], None],
               blocks: list[int] | None = None) -> None:
        """Receiving side: transfer `xfer` of `num_blocks` blocks comes from `src`, into `blocks`
        (reserved by the caller) or blocks reserved here when the transfer's turn comes; once every
        chunk is unpacked, `land(block_ids)` takes them over."""
        self.announced.append(Incoming(src, xfer, num_kv_tokens, num_blocks, land, list(blocks or [])))

    def receive_first(self, src: int, blocks: list[int], num_kv_tokens: int,
                      land: Callable[[list[int]], None]) -> Incoming | None:
        """Receiving side of a pull: post the receive of a transfer's first chunk into `blocks`
        (reserved by the caller) before the transfer exists, so that the request that announces
        it (PULL) can say so instead of a READY; None (nothing posted) when the chunk must wait
        for staging room. The rest follows once `confirm` names the transfer."""
        if self.receives >= self.max_receiving:
            return None
        inc = Incoming(src, -1, num_kv_tokens, len(blocks), land, list(blocks))
        count = min(self.chunk_blocks, inc.num_blocks)
        if not self._fits(count * self.block_bytes):
            return None
        self.incoming.append(inc)
        self._post(inc, _Chunk(0, count, count * self.block_bytes))
        return inc

    def confirm(self, inc: Incoming, xfer: int, num_blocks: int) -> None:
        """The sender names the transfer whose first chunk `receive_first` posted, and its length
        (at least that chunk: a sender that holds fewer blocks pads it); its other chunks follow
        with READY, as a handoff's."""
        assert inc.xfer == -1 and inc.next_block <= num_blocks <= inc.num_blocks, (inc.next_block, num_blocks)
        inc.xfer = xfer
        inc.num_kv_tokens = inc.num_kv_tokens * num_blocks // inc.num_blocks
        inc.num_blocks = num_blocks
        inc.blocks = inc.blocks[:num_blocks]
        if inc.next_block < num_blocks:
            self.announced.append(inc)

    def _outgoing(self, dest: int, num_kv_tokens: int, num_blocks: int, send: Callable[[int, int, int], Pending],
                  release: Callable[[float], None]) -> int:
        xfer = self.next_xfer.get(dest, 0)
        self.next_xfer[dest] = xfer + 1
        self.outgoing[(dest, xfer)] = _Outgoing(dest, num_blocks, num_kv_tokens, send, release)
        return xfer

    def _handed_off(self, request_id: str, num_blocks: int, seconds: float) -> None:
        self.stats.handoffs_sent += 1
        self.stats.handoff_bytes += num_blocks * self.block_bytes
        self.stats.handoff_seconds += seconds
        self.engine.free_kv(request_id)

    def _received(self, state: SeqState, block_ids: list[int]) -> None:
        self.engine.add_received(state, block_ids)
        self.stats.handoffs_received += 1

    def on_ready(self, src: int, msg: Ready) -> None:
        # Sends start in READY order (a later one never overtakes one waiting for room).
        out = self.outgoing[(src, msg.xfer)]
        assert msg.first + msg.count <= out.num_blocks, (msg, out.num_blocks)
        self.ready.append((out, _Chunk(msg.first, msg.count, msg.count * self.block_bytes)))

    # --- moving transfers along -----------------------------------------------------------------

    def progress(self) -> bool:
        """Finish completed chunks, start those that fit; True if anything moved."""
        moved = self._finish_sends()
        while self.ready and self._fits(self.ready[0][1].nbytes):
            self._send(*self.ready.popleft())
            moved = True
        while self.announced and self.receives < self.max_receiving:
            if not self._receive(self.announced[0]):
                break
            moved = True
        return self._finish_receives() or moved

    def _fits(self, nbytes: int) -> bool:
        """Room to stage `nbytes` more: within the budget, or nothing staged at all (a single
        block larger than the whole budget)."""
        return self.staged == 0 or self.staged + nbytes <= self.staging_budget

    def _stage(self, nbytes: int) -> None:
        self.staged += nbytes
        self.stats.max_staged_bytes = max(self.stats.max_staged_bytes, self.staged)

    def _sim_done(self, xfer: _Outgoing | Incoming, num_kv_tokens: int, chunk: _Chunk) -> float:
        """When a simulated chunk is done: its share of the whole transfer's modeled time, after
        the transfer's earlier chunks (one link: chunks in flight together do not go faster)."""
        share = self.engine.transfer_s(num_kv_tokens) * chunk.count / xfer.num_blocks
        xfer.busy_until = max(self.clock(), xfer.busy_until) + share
        return xfer.busy_until

    def _send(self, out: _Outgoing, chunk: _Chunk) -> None:
        self._stage(chunk.nbytes)
        now = self.clock()
        if out.started is None:
            out.started = now
        chunk.not_before = self._sim_done(out, out.num_kv_tokens, chunk)
        chunk.pending = out.send(chunk.first, chunk.count, out.dest)
        out.sending.append(chunk)

    def _finish_sends(self) -> bool:
        moved = False
        now = self.clock()
        for key, out in list(self.outgoing.items()):
            for chunk in [c for c in out.sending if c.pending.done() and now >= c.not_before]:
                out.sending.remove(chunk)
                out.blocks_sent += chunk.count
                self.staged -= chunk.nbytes
                self.stats.chunks_sent += 1
                moved = True
            if out.blocks_sent == out.num_blocks:
                del self.outgoing[key]
                out.release(now - out.started)
        return moved

    def _receive(self, inc: Incoming) -> bool:
        """Post the receive of the next chunk of the first announced transfer (reserving its
        blocks first); False if it must wait for room or blocks."""
        count = min(self.chunk_blocks, inc.num_blocks - inc.next_block)
        chunk = _Chunk(inc.next_block, count, count * self.block_bytes)
        if not self._fits(chunk.nbytes):
            return False
        if inc.next_block == 0:
            if not inc.blocks:
                blocks = self.engine.reserve(inc.num_kv_tokens)
                if blocks is None:
                    return False
                inc.blocks = blocks
            assert len(inc.blocks) == inc.num_blocks
            self.incoming.append(inc)
        self._post(inc, chunk)
        self.outbox.send(Ready(inc.xfer, chunk.first, count), inc.src)
        if inc.next_block == inc.num_blocks:
            self.announced.popleft()
        return True

    def _post(self, inc: Incoming, chunk: _Chunk) -> None:
        self._stage(chunk.nbytes)
        chunk.not_before = self._sim_done(inc, inc.num_kv_tokens, chunk)
        chunk.pending = self.link.recv(chunk.count, inc.src)
        inc.receiving.append(chunk)
        inc.next_block += chunk.count
        self.receives += 1

    def _finish_receives(self) -> bool:
        moved = False
        now = self.clock()
        for inc in list(self.incoming):
            for chunk in [c for c in inc.receiving if c.pending.done() and now >= c.not_before]:
                inc.receiving.remove(chunk)
                chunk.pending.unpack(inc.blocks[chunk.first : chunk.first + chunk.count])
                self.staged -= chunk.nbytes
                self.receives -= 1
                inc.blocks_received += chunk.count
                self.stats.chunks_received += 1
                moved = True
            if inc.blocks_received == inc.num_blocks and inc.xfer >= 0:  # (a pull's length is known)
                self.incoming.remove(inc)
                inc.land(inc.blocks)
        return moved

