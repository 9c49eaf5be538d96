"""Worker rank: one engine on one device, serving the router; prefill, decode or aggregated.

The loop is: receive control messages -> move KV transfers along -> one engine step -> send
results -> publish load in the window. Nothing in it blocks: a decode worker keeps decoding
while KV arrives, and a prefill worker keeps prefilling while KV leaves.

Handoff protocol, per request (prefill P -> decode D):
  P samples the first token and sends HANDOFF (request, tokens, sampler state, KV size) to D;
  D reserves blocks when it has them (until then the HANDOFF waits in D's queue: memory stays
  bounded), posts the receive of the packed KV, and answers READY; P packs the blocks and sends
  them; when the send completes P frees its blocks, and when the receive completes D unpacks
  into its reserved blocks and starts decoding. Transfers between a pair start in READY order on
  both sides, which NCCL needs (its point-to-point operations match in posting order).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from mpi4py import MPI

from kvrelay.configs.schema import JobConfig
from kvrelay.ranks.engine.engine import Engine
from kvrelay.ranks.engine.sequence import Sequence
from kvrelay.core.messages import Assign, Handoff, Outbox, Ready, Tag, poll
from kvrelay.ranks.transport import Pending, make_transport
from kvrelay.core.window import CacheWindow
from kvrelay.core.request import Request

log = logging.getLogger("kvrelay")

ROUTER = 0
MAX_RECEIVING = 8  # KV receives in flight per decode worker: bounds its staging memory
# NOTE: an idle worker sleeps, doubling the nap up to IDLE_SLEEP_MAX_S, instead of spinning on
# Iprobe: many simulated workers share few cores, and a spinning idle rank takes CPU from busy
# ones. The router's window reads need nothing from the worker (shared memory), so only a new
# message waits, by at most IDLE_SLEEP_MAX_S.
IDLE_SLEEP_S = 0.0002
IDLE_SLEEP_MAX_S = 0.002


@dataclass
class WorkerStats:
    handoffs_sent: int = 0
    handoffs_received: int = 0
    handoff_bytes: int = 0
    handoff_seconds: float = 0.0  # send posted -> send seen complete, summed
    step_wall_s: float = 0.0  # wall time inside engine steps


@dataclass
class _Outgoing:
    seq: Sequence
    dest: int
    pending: Pending | None = None
    buf: torch.Tensor | None = None
    started: float = 0.0
    not_before: float = 0.0  # perf_counter time before which a simulated transfer is not done


@dataclass
class _Incoming:
    src: int
    handoff: Handoff
    blocks: list[int] = field(default_factory=list)
    pending: Pending | None = None
    buf: torch.Tensor | None = None
    not_before: float = 0.0


class Worker:
    def __init__(self, cfg: JobConfig, world: MPI.Comm, workers: MPI.Comm, role: str, device: torch.device):
        self.world = world
        self.role = role
        # NOTE: packed KV leaves and arrives in staging buffers outside the KV cache. Sized only by
        # the KV cache's fraction of memory they ran a decode GPU out of memory on long prompts,
        # so a split worker keeps cache.handoff_buffer_gib out of its cache and never stages more
        # than that at once (a transfer larger than the whole budget still goes, alone).
        self.staging_budget = int(cfg.cache.handoff_buffer_gib * (1 << 30)) if role in ("prefill", "decode") else 0
        self.engine = Engine.from_config(cfg, device, staging_bytes=self.staging_budget)
        pool = self.engine.pool
        # Collective over the world: the router creates its reader at the same point.
        self.window = CacheWindow.create(world, pool.num_blocks, role)
        pool.on_cache, pool.on_evict = self.window.on_cache, self.window.on_evict
        # Collective over the workers (NCCL bootstrap on GPUs).
        self.transport = make_transport(workers, device)
        self.outbox = Outbox(world)
        self.stats = WorkerStats()
        self.decode_rank: dict[str, int] = {}  # request id -> where it decodes (prefill worker)
        self.requests: dict[str, dict] = {}  # request id -> wire form, until handed off
        self.next_xfer: dict[int, int] = {}  # decode rank -> next transfer number
        self.outgoing: dict[tuple[int, int], _Outgoing] = {}  # (decode rank, xfer) -> handoff
        self.announced: deque[_Incoming] = deque()  # waiting for free blocks
        self.incoming: list[_Incoming] = []  # receives in flight
        self.ready: deque[_Outgoing] = deque()  # READY received, send waiting for staging room
        self.staged = 0  # bytes of packed KV held in staging buffers (sends and receives)
        self.shutdown = False

    def run(self) -> None:
        status = MPI.Status()
        nap = IDLE_SLEEP_S
        while True:
            busy = False
            while (msg := poll(self.world, status)) is not None:
                self._dispatch(*msg)
                busy = True
            self.outbox.progress()
            busy |= self._move_transfers()
            if self.engine.has_work():
                t0 = time.perf_counter()
                for result in self.engine.step():
                    self.outbox.send(result.to_wire(), ROUTER, Tag.RESULT)
                for request_id in self.engine.prefilled:
                    self.outbox.send({"request_id": request_id}, ROUTER, Tag.PREFILLED)
                self.engine.prefilled.clear()
                self.stats.step_wall_s += time.perf_counter() - t0
                if self.engine.runner.simulated and not self.engine.has_work():
                    self.engine.runner.idle()
                self._announce_handoffs()
                busy = True
            self._publish()
            if self.shutdown and not self._has_work():
                break
            if busy:
                nap = IDLE_SLEEP_S
            else:
                time.sleep(nap)
                nap = min(2 * nap, IDLE_SLEEP_MAX_S)
        e = self.engine
        stats = {"rank": self.world.rank, "role": self.role, "device": str(e.runner.device),
                 "kv_blocks": e.pool.num_blocks, **vars(e.stats), **vars(self.stats)}
        if e.runner.simulated:
            stats["sim"] = vars(e.runner.stats)
        else:
            stats["memory"] = e.runner.memory_report()
        self.outbox.send(stats, ROUTER, Tag.STATS)
        self.outbox.flush()

    def _has_work(self) -> bool:
        return bool(self.engine.has_work() or self.outgoing or self.announced or self.incoming or self.ready)

    def _dispatch(self, tag: Tag, src: int, payload) -> None:
        if tag is Tag.REQUEST:
            assign = Assign(**payload)
            req = Request.from_wire(assign.request)
            handoff = assign.decode_rank is not None
            if handoff:
                self.decode_rank[req.request_id] = assign.decode_rank
                self.requests[req.request_id] = assign.request
            self.engine.add_request(req, handoff=handoff)
        elif tag is Tag.HANDOFF:
            self.announced.append(_Incoming(src, Handoff(**payload)))
        elif tag is Tag.READY:
            # Sends start in READY order (a later one never overtakes one waiting for room).
            self.ready.append(self.outgoing[(src, Ready(**payload).xfer)])
        elif tag is Tag.SHUTDOWN:
            self.shutdown = True
        else:
            raise RuntimeError(f"worker got an unexpected {tag.name} message from rank {src}")

    def _announce_handoffs(self) -> None:
        for seq in self.engine.handoffs:
            dest = self.decode_rank.pop(seq.request_id)
            xfer = self.next_xfer.get(dest, 0)
            self.next_xfer[dest] = xfer + 1
            state, gen = self.engine.handoff_state(seq)
            num_tokens = seq.num_tokens - 1  # the first sampled token has no KV yet
            msg = Handoff(xfer, self.requests.pop(seq.request_id), state, gen, num_tokens)
            self.outbox.send(msg, dest, Tag.HANDOFF)
            self.outbox.send({"request_id": seq.request_id}, ROUTER, Tag.PREFILLED)
            self.outgoing[(dest, xfer)] = _Outgoing(seq, dest)
        self.engine.handoffs.clear()

    def _fits(self, nbytes: int) -> bool:
        """Room to stage `nbytes` more: within the budget, or nothing staged at all."""
        return self.staged == 0 or self.staged + nbytes <= self.staging_budget

    def _packed_bytes(self, num_tokens: int) -> int:
        n = -(-num_tokens // self.engine.pool.block_size)
        return n * self.engine.runner.block_bytes()

    def _send_kv(self, out: _Outgoing) -> None:
        num_tokens = out.seq.num_tokens - 1
        n = -(-num_tokens // self.engine.pool.block_size)
        out.buf = self.engine.runner.pack_kv(out.seq.block_ids[:n])
        self.staged += out.buf.numel() * out.buf.element_size()
        out.started = time.perf_counter()
        out.not_before = out.started + self.engine.runner.transfer_s(num_tokens)
        out.pending = self.transport.send(out.buf, self._peer(out.dest), self._kv_tag(out.dest))

    def _move_transfers(self) -> bool:
        moved = False
        for key, out in list(self.outgoing.items()):
            if out.pending is not None and out.pending.done() and time.perf_counter() >= out.not_before:
                self.stats.handoffs_sent += 1
                self.stats.handoff_bytes += out.buf.numel() * out.buf.element_size()
                self.stats.handoff_seconds += time.perf_counter() - out.started
                self.staged -= out.buf.numel() * out.buf.element_size()
                self.engine.release(out.seq)
                del self.outgoing[key]
                moved = True
        while self.ready and self._fits(self._packed_bytes(self.ready[0].seq.num_tokens - 1)):
            self._send_kv(self.ready.popleft())
            moved = True
        while self.announced and len(self.incoming) < MAX_RECEIVING:
            inc = self.announced[0]
            if not self._fits(self._packed_bytes(inc.handoff.num_tokens)):
                break
            blocks = self.engine.reserve(inc.handoff.num_tokens)
            if blocks is None:
                break
            self.announced.popleft()
            inc.blocks = blocks
            inc.buf = self.engine.runner.kv_buffer(len(blocks))
            self.staged += inc.buf.numel() * inc.buf.element_size()
            inc.not_before = time.perf_counter() + self.engine.runner.transfer_s(inc.handoff.num_tokens)
            inc.pending = self.transport.recv(inc.buf, self._peer(inc.src), self._kv_tag(self.world.rank))
            self.outbox.send(Ready(inc.handoff.xfer), inc.src, Tag.READY)
            self.incoming.append(inc)
            moved = True
        now = time.perf_counter()
        for inc in [i for i in self.incoming if i.pending.done() and now >= i.not_before]:
            self.incoming.remove(inc)
            self.engine.runner.unpack_kv(inc.buf, inc.blocks)
            self.staged -= inc.buf.numel() * inc.buf.element_size()
            h = inc.handoff
            self.engine.add_prefilled(Request.from_wire(h.request), h.seq_state, h.generator_state, inc.blocks)
            self.stats.handoffs_received += 1
            moved = True
        return moved

    @staticmethod
    def _peer(world_rank: int) -> int:
        return world_rank - 1  # the workers' communicator is the world without the router

    @staticmethod
    def _kv_tag(decode_rank: int) -> int:
        # NOTE: one tag per pair direction is enough: MPI matches messages of one (source, tag)
        # in posting order, and both sides post in READY order.
        return decode_rank

    def _publish(self) -> None:
        e = self.engine
        self.window.publish(
            free_blocks=e.pool.num_free,
            total_blocks=e.pool.num_blocks,
            queued_prefill_tokens=e.scheduler.num_queued_prefill_tokens,
            running_seqs=len(e.scheduler.running) + len(e.scheduler.prefilled),
            active_decode_blocks=e.pool.num_blocks - e.pool.num_free,
            step=e.stats.steps,
        )
