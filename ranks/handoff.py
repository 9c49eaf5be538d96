"""Handoffs: a worker's KV transfers to and from other workers, and the staging budget they share.

Protocol, per request (prefill P -> decode D):
  P's engine stops the request after its first token; `start` sends HANDOFF (the SeqState: the
  prompt once, the tokens so far, sampler state) to D. D queues it (`announced`) until it can
  reserve the blocks and stage the bytes, then posts the receive of the packed KV and answers
  READY. P queues the READY (`ready`) until it can stage the bytes, then packs the blocks and
  sends them (`outgoing`). When the send completes P frees the blocks; when the receive completes
  D unpacks into its reserved blocks and the engine starts decoding (`incoming` -> engine).

Ordering: transfers between a pair start in READY order on both sides, which NCCL needs (its
point-to-point operations match in posting order): D posts receives in HANDOFF order, P starts
sends in READY order, and a later READY never overtakes an earlier one waiting for room.

Staging budget: packed KV leaves and arrives in buffers outside the KV cache; sends and receives
together never stage more than `staging_budget` bytes, except that a transfer larger than the
whole budget still goes when nothing else is staged (alone).

The engine's KV surface, the transport and the outbox are injected (tests/test_handoff.py drives
this with fakes, without MPI).

NOTE: no deadlock, because a send starts only after its receive is posted (READY), so staged
sends always drain. A transfer is one buffer today. To split it into chunks bounded by the budget
(issue 13), keep that rule per chunk: D posts chunk i's receive when it has room and answers
READY(xfer, i); P sends chunk i on that READY. `_Outgoing`/`_Incoming` then carry a chunk cursor,
`_fits` tests the next chunk's bytes, and a pair's chunks stay in order because both sides finish
one transfer's chunks before the next one's; the queues and the budget check stay as they are.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvrelay.core.messages import Handoff, Message, Ready, SeqState
from kvrelay.ranks.transport import KVTransport, Pending

MAX_RECEIVING = 8  # KV receives in flight per decode worker: bounds its staging memory


class KVEngine(Protocol):
    """The part of ranks/engine/engine.py's Engine that a handoff uses."""

    def kv_bytes(self, num_tokens: int) -> int: ...
    def reserve(self, num_tokens: int) -> list[int] | None: ...
    def pack_kv(self, request_id: str) -> torch.Tensor: ...
    def staging_buffer(self, n: int) -> torch.Tensor: ...
    def unpack_kv(self, buf: torch.Tensor, block_ids: list[int]) -> None: ...
    def transfer_s(self, num_tokens: int) -> float: ...
    def free_kv(self, request_id: str) -> None: ...
    def add_received(self, state: SeqState, block_ids: list[int]) -> None: ...


class Sender(Protocol):
    def send(self, record: Message, dest: int) -> None: ...


@dataclass
class HandoffStats:
    handoffs_sent: int = 0
    handoffs_received: int = 0
    handoff_bytes: int = 0
    handoff_seconds: float = 0.0  # send posted -> send seen complete, summed


@dataclass
class _Outgoing:
    state: SeqState
    dest: int
    pending: Pending | None = None
    nbytes: int = 0
    started: float = 0.0
    not_before: float = 0.0  # clock time before which a simulated transfer is not done


@dataclass
class _Incoming:
    src: int
    handoff: Handoff
    blocks: list[int] = field(default_factory=list)
    pending: Pending | None = None
    buf: torch.Tensor | None = None
    not_before: float = 0.0


def _nbytes(buf: torch.Tensor) -> int:
    return buf.numel() * buf.element_size()


class Handoffs:
    def __init__(self, engine: KVEngine, transport: KVTransport, outbox: Sender, rank: int, staging_budget: int,
                 max_receiving: int = MAX_RECEIVING, clock: Callable[[], float] = time.perf_counter) -> None:
        self.engine = engine
        self.transport = transport
        self.outbox = outbox
        self.rank = rank  # this worker's rank in the world (the router is rank 0)
        self.staging_budget = staging_budget
        self.max_receiving = max_receiving
        self.clock = clock
        self.stats = HandoffStats()
        self.next_xfer: dict[int, int] = {}  # decode rank -> next transfer number
        self.outgoing: dict[tuple[int, int], _Outgoing] = {}  # (decode rank, xfer) -> handoff announced
        self.ready: deque[_Outgoing] = deque()  # READY received, send waiting for staging room
        self.announced: deque[_Incoming] = deque()  # HANDOFF received, waiting for blocks and room
        self.incoming: list[_Incoming] = []  # receives in flight
        self.staged = 0  # bytes of packed KV held in staging buffers (sends and receives)

    def busy(self) -> bool:
        return bool(self.outgoing or self.announced or self.incoming or self.ready)

    # --- messages in and out --------------------------------------------------------------------

    def start(self, state: SeqState, dest: int) -> None:
        """Prefill side: announce a sequence's KV to the decode worker `dest`."""
        xfer = self.next_xfer.get(dest, 0)
        self.next_xfer[dest] = xfer + 1
        self.outbox.send(Handoff(xfer, state), dest)
        self.outgoing[(dest, xfer)] = _Outgoing(state, dest)

    def on_handoff(self, src: int, msg: Handoff) -> None:
        """Decode side: a prefill worker announced a transfer."""
        self.announced.append(_Incoming(src, msg))

    def on_ready(self, src: int, msg: Ready) -> None:
        # Sends start in READY order (a later one never overtakes one waiting for room).
        self.ready.append(self.outgoing[(src, msg.xfer)])

    # --- moving transfers along -----------------------------------------------------------------

    def progress(self) -> bool:
        """Finish completed transfers, start those that fit; True if anything moved."""
        moved = self._finish_sends()
        while self.ready and self._fits(self.engine.kv_bytes(self.ready[0].state.num_kv_tokens)):
            self._send(self.ready.popleft())
            moved = True
        while self.announced and len(self.incoming) < self.max_receiving:
            if not self._receive(self.announced[0]):
                break
            self.announced.popleft()
            moved = True
        return self._finish_receives() or moved

    def _fits(self, nbytes: int) -> bool:
        """Room to stage `nbytes` more: within the budget, or nothing staged at all."""
        return self.staged == 0 or self.staged + nbytes <= self.staging_budget

    def _send(self, out: _Outgoing) -> None:
        buf = self.engine.pack_kv(out.state.request_id)
        out.nbytes = _nbytes(buf)
        self.staged += out.nbytes
        out.started = self.clock()
        out.not_before = out.started + self.engine.transfer_s(out.state.num_kv_tokens)
        out.pending = self.transport.send(buf, self._peer(out.dest), self._kv_tag(out.dest))

    def _finish_sends(self) -> bool:
        moved = False
        for key, out in list(self.outgoing.items()):
            if out.pending is not None and out.pending.done() and self.clock() >= out.not_before:
                self.stats.handoffs_sent += 1
                self.stats.handoff_bytes += out.nbytes
                self.stats.handoff_seconds += self.clock() - out.started
                self.staged -= out.nbytes
                self.engine.free_kv(out.state.request_id)
                del self.outgoing[key]
                moved = True
        return moved

    def _receive(self, inc: _Incoming) -> bool:
        """Reserve blocks and post the receive of an announced transfer; False if it must wait."""
        num_tokens = inc.handoff.state.num_kv_tokens
        if not self._fits(self.engine.kv_bytes(num_tokens)):
            return False
        blocks = self.engine.reserve(num_tokens)
        if blocks is None:
            return False
        inc.blocks = blocks
        inc.buf = self.engine.staging_buffer(len(blocks))
        self.staged += _nbytes(inc.buf)
        inc.not_before = self.clock() + self.engine.transfer_s(num_tokens)
        inc.pending = self.transport.recv(inc.buf, self._peer(inc.src), self._kv_tag(self.rank))
        self.outbox.send(Ready(inc.handoff.xfer), inc.src)
        self.incoming.append(inc)
        return True

    def _finish_receives(self) -> bool:
        now = self.clock()
        done = [i for i in self.incoming if i.pending.done() and now >= i.not_before]
        for inc in done:
            self.incoming.remove(inc)
            self.engine.unpack_kv(inc.buf, inc.blocks)
            self.staged -= _nbytes(inc.buf)
            self.engine.add_received(inc.handoff.state, inc.blocks)
            self.stats.handoffs_received += 1
        return bool(done)

    @staticmethod
    def _peer(world_rank: int) -> int:
        return world_rank - 1  # the workers' communicator is the world without the router

    @staticmethod
    def _kv_tag(decode_rank: int) -> int:
        # NOTE: one tag per pair direction is enough: MPI matches messages of one (source, tag)
        # in posting order, and both sides post in READY order.
        return decode_rank
