"""Pulls: a worker fetches a prompt's cached prefix from another worker's KV cache instead of
computing it (router.pulls; the router decides, router/pulls.py).

Protocol, per request (puller B, source A; the router's Assign says "A holds the first n blocks"):

  B  hashes the prompt's first n blocks; once it can, pins its own leading hits (b blocks) and
     reserves n - b blocks, in one go (`progress`). b == n: the request goes to the engine now.
     B posts the receive of the transfer's first chunk (f blocks, into the first reserved ones)
     when its staging room allows, else f = 0.
  B -> A  PULL(pull, hashes[b:n], f)
  A  pins the leading run of those hashes its cache still holds, continued (`from_host`) by the
     run its host tier holds past them, copied out (k <= n - b blocks; pinned blocks are referenced
     and pinned host slots are neither dropped nor refilled, so nothing takes them while they
     leave; a chunk with host blocks is packed from host memory, ranks/engine/host_memory.py
     `gather`, on the compute stream before its send) and offers them to B as a
     transfer of its Handoffs (`serve`) of t = max(k, f) blocks, the first chunk's send queued at
     once, as if its READY had come (past k it sends padding: any block's bytes).
  A -> B  PULLED(pull, k, xfer)
  B  gives back the reserved blocks past t (nothing went into them). t == 0: the request goes to
     the engine, which computes what is missing. Else the rest of the transfer runs as a handoff's
     (READY per chunk, the staging budget, ranks/handoff.py) into the first t reserved blocks, and
     when it lands B registers the first k by hash (they are B's cached blocks from then on, for
     this request and any later one), gives back the other t - k, unpins its own hits, and gives
     the request to the engine, whose prefix match takes the b + k blocks. A unpins its blocks
     after the last chunk's send.

A pull of up to a chunk's blocks (MAX_CHUNK_BLOCKS, or what the staging budget holds) thus takes
one control round trip: its data leaves A on the PULL's arrival. Without the early receive it took
two (PULL, PULLED; READY, data), each through both workers' loops. The cost: a source that lost
blocks since the router's decision still fills the first chunk, with bytes B drops.

Both sides keep stepping meanwhile: the request waits here ("pulling"), outside the engine, while
B's other sequences run, and A's steps never wait for a pull. A later request to B that would
compute the blocks on their way (the router sends it without a pull: its books credit B with the
prefix) waits with it (`hold`), as the scheduler holds back a prefix another sequence computes.
Blocks that A evicted between the router's decision and the PULL are simply not sent: B computes
them, never reads a stale block (the hashes are chained, so a hash names its whole prefix).

NOTE: B reserves its blocks before it asks, so A pins blocks only for a receiver that has room
for them and A's pins are released as fast as the transfer goes. Were B to reserve after
PULLED, A's pins could wait on B's free blocks while B's blocks are pinned for A's pulls (a cycle
through full caches).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from kvrelay.core.messages import Pull, Pulled, Ready
from kvrelay.core.request import Request
from kvrelay.ranks.handoff import Handoffs, Sender, Incoming


class PullEngine(Protocol):
    """The part of ranks/engine/engine.py's Engine that a pull uses."""

    def prompt_hashes(self, token_ids: list[int]) -> list[int]: ...
    def pin_cached(self, hashes: list[int]) -> list[int]: ...
    def unpin(self, block_ids: list[int], cold: bool = False) -> None: ...
    def pin_host(self, hashes: list[int]) -> list[int]: ...
    def unpin_host(self, slots: list[int]) -> None: ...
    def reserve(self, num_tokens: int) -> list[int] | None: ...
    def adopt_blocks(self, hashes: list[int], block_ids: list[int]) -> None: ...


@dataclass
class PullStats:
    pulls: int = 0  # requests that asked another worker for blocks
    pulled_blocks: int = 0  # blocks that arrived and were registered here
    pulled_bytes: int = 0
    pull_missing_blocks: int = 0  # asked for, but the source no longer held them: computed here
    pull_padded_blocks: int = 0  # received as padding of a first chunk (the source held fewer), dropped
    pull_seconds: float = 0.0  # PULL sent -> blocks registered, summed
    pulls_served: int = 0  # PULLs answered with at least one block
    served_blocks: int = 0
    served_host_blocks: int = 0  # of those, sent from the host tier


@dataclass
class _Pull:
    request: Request
    src: int
    hashes: list[int]  # the prompt's first n block hashes
    own: list[int] = field(default_factory=list)  # this worker's pinned leading hits
    reserved: list[int] = field(default_factory=list)  # for the blocks asked for
    asked: float = 0.0
    early: Incoming | None = None  # its first chunk's receive, posted before PULL
    count: int = 0  # blocks the source holds and sends (PULLED)
    followers: list[Request] = field(default_factory=list)  # requests here that wait for these blocks too


class Pulls:
    def __init__(self, engine: PullEngine, handoffs: Handoffs, outbox: Sender, block_size: int,
                 admit: Callable[[Request], None], clock: Callable[[], float] = time.perf_counter,
                 from_host: bool = False) -> None:
        self.engine = engine
        self.from_host = from_host  # serve blocks past the GPU cache's run from the host tier too
        self.handoffs = handoffs
        self.outbox = outbox
        self.block_size = block_size
        self.admit = admit  # gives a request to the engine (as the worker does without a pull)
        self.clock = clock
        self.stats = PullStats()
        self.next_pull = 0
        self.waiting: deque[_Pull] = deque()  # to pin and reserve, in arrival order
        self.asked: dict[int, _Pull] = {}  # pull number -> PULL sent, PULLED not yet received
        self.landing = 0  # transfers expected, not landed
        self.active: list[_Pull] = []  # every pull from `start` until its request is admitted

    def busy(self) -> bool:
        return bool(self.waiting or self.asked or self.landing)

    # --- puller ---------------------------------------------------------------------------------

    def start(self, request: Request, src: int, num_blocks: int) -> None:
        """The router placed `request` here, with its first `num_blocks` blocks cached on `src`."""
        hashes = self.engine.prompt_hashes(request.prompt_token_ids)[:num_blocks]
        if not self.hold(request):
            self.waiting.append(_Pull(request, src, hashes))
            self.active.append(self.waiting[-1])

    def hold(self, request: Request) -> bool:
        """Keep a request back while a pull here brings the first blocks it would compute itself
        (the router credits this worker with a prefix in flight and sends its next requests without
        a pull); it goes to the engine with that pull's request. False: nothing to wait for."""
        if not self.active:
            return False
        hashes = self.engine.prompt_hashes(request.prompt_token_ids)
        for p in self.active:
            i = len(p.own)  # the first block the pull brings (0 before it asked)
            if i < len(p.hashes) and i < len(hashes) and hashes[i] == p.hashes[i]:
                p.followers.append(request)
                return True
        return False

    def progress(self) -> bool:
        """Pin and reserve for the waiting pulls, in order, while blocks are free; True if any moved."""
        moved = False
        while self.waiting:
            p = self.waiting[0]
            own = self.engine.pin_cached(p.hashes)
            want = len(p.hashes) - len(own)
            reserved = self.engine.reserve(want * self.block_size) if want else []
            if reserved is None:
                self.engine.unpin(own)
                break
            self.waiting.popleft()
            moved = True
            p.own, p.reserved = own, reserved
            if not want:  # this worker holds them already (the router's view was stale)
                self._admit(p)
                continue
            pull = self.next_pull
            self.next_pull += 1
            p.asked = self.clock()
            self.asked[pull] = p
            self.stats.pulls += 1
            p.early = self.handoffs.receive_first(p.src, reserved, want * self.block_size, partial(self._landed, p))
            self.outbox.send(Pull(pull, p.hashes[len(own) :], p.early.next_block if p.early else 0), p.src)
        return moved

    def on_pulled(self, src: int, msg: Pulled) -> None:
        p = self.asked.pop(msg.pull)
        assert src == p.src and 0 <= msg.count <= len(p.reserved), (msg, len(p.reserved))
        p.count = msg.count
        self.stats.pull_missing_blocks += len(p.reserved) - msg.count
        total = max(msg.count, p.early.next_block if p.early else 0)  # blocks the transfer fills
        self.engine.unpin(p.reserved[total:])
        if total == 0:
            self._admit(p)
            return
        self.landing += 1
        if p.early is not None:
            self.handoffs.confirm(p.early, msg.xfer, total)
        else:
            self.handoffs.expect(src, msg.xfer, total * self.block_size, total, partial(self._landed, p),
                                 blocks=p.reserved[:total])

    def _landed(self, p: _Pull, block_ids: list[int]) -> None:
        # NOTE: blocks past the source's count hold padding; they were referenced (reserved) until
        # now, so nothing else could read or write them meanwhile, and go back unregistered.
        b, k = len(p.own), p.count
        self.engine.adopt_blocks(p.hashes[b : b + k], block_ids[:k])
        self.engine.unpin(block_ids[k:])
        self.landing -= 1
        self.stats.pulled_blocks += k
        self.stats.pulled_bytes += k * self.handoffs.block_bytes
        self.stats.pull_padded_blocks += len(block_ids) - k
        self.stats.pull_seconds += self.clock() - p.asked
        self._admit(p)

    def _admit(self, p: _Pull) -> None:
        # NOTE: unpinned, the prefix sits at the warm end of the free blocks until the request's
        # admission (its first schedule) takes it; only a cache that turns over entirely before
        # then loses it, and that costs a recompute.
        self.engine.unpin(p.own)
        self.active.remove(p)
        for request in (p.request, *p.followers):
            self.admit(request)

    # --- source ---------------------------------------------------------------------------------

    def on_pull(self, src: int, msg: Pull) -> None:
        """Another worker asks for blocks: pin those still held and offer them to it, the first
        chunk at once if its receive is posted (padded past what is held)."""
        blocks = self.engine.pin_cached(msg.hashes)
        slots = self.engine.pin_host(msg.hashes[len(blocks) :]) if self.from_host else []
        held = len(blocks) + len(slots)
        total = max(held, msg.first)
        if not total:
            self.outbox.send(Pulled(msg.pull, 0), src)
            return
        # Padding (any block's bytes) repeats the last item sent, or reads block 0 when none is held.
        pad = [slots[-1] if slots else blocks[-1] if blocks else 0] * (total - held)
        ids, host = (blocks, slots + pad) if slots else (blocks + pad, [])
        xfer = self.handoffs.serve(src, ids, total * self.block_size, partial(self._served, blocks, slots), host)
        if msg.first:
            self.handoffs.on_ready(src, Ready(xfer, 0, msg.first))  # the PULL stands for the first READY
        self.outbox.send(Pulled(msg.pull, held, xfer), src)

    def _served(self, blocks: list[int], slots: list[int], seconds: float) -> None:
        # NOTE: the source's copy goes to the cold end of its LRU: the request went to the puller,
        # whose copy its next turn (a conversation's longer prefix) will find, so keeping both warm
        # would spend two caches on one prefix. Blocks a running sequence still uses stay put.
        self.engine.unpin(blocks, cold=True)
        self.engine.unpin_host(slots)
        self.stats.pulls_served += bool(blocks or slots)
        self.stats.served_blocks += len(blocks) + len(slots)
        self.stats.served_host_blocks += len(slots)
