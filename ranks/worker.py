"""Worker rank: one engine on one device, serving the router; prefill, decode or aggregated.

The loop is: receive control messages -> move KV transfers along -> one engine step -> send
what the step produced -> publish the engine's load in the window. Nothing in it blocks: a
decode worker keeps decoding while KV arrives, and a prefill worker keeps prefilling while KV
leaves. The KV transfers and their protocol are ranks/handoff.py's; pulls of another worker's
cached blocks (router.pulls) are ranks/pulls.py's.

    mpiexec -n 3 python -m kvrelay.launch.cli run -i in.jsonl -o out.jsonl --model DIR --set roles.aggregated=2
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch
from mpi4py import MPI

from kvrelay.configs.schema import JobConfig
from kvrelay.ranks.engine.engine import Engine, StepOutput
from kvrelay.ranks.handoff import Handoffs
from kvrelay.core.messages import Assign, Handoff, Outbox, Prefilled, Pull, Pulled, Ready, Result, Shutdown, Stats, poll
from kvrelay.core.request import Request
from kvrelay.ranks.pulls import Pulls
from kvrelay.ranks.transport import make_transport
from kvrelay.core.window import CacheWindow

log = logging.getLogger("kvrelay")

ROUTER = 0
# NOTE: an idle worker sleeps, doubling the nap up to IDLE_SLEEP_MAX_S, instead of spinning on
# Iprobe: many simulated workers share few cores, and a spinning idle rank takes CPU from busy
# ones. The router's window reads need nothing from the worker (shared memory), so only a new
# message waits, by at most IDLE_SLEEP_MAX_S.
IDLE_SLEEP_S = 0.0002
IDLE_SLEEP_MAX_S = 0.002


class Worker:
    def __init__(self, cfg: JobConfig, world: MPI.Comm, workers: MPI.Comm, role: str, device: torch.device):
        self.world = world
        self.role = role
        # NOTE: packed KV leaves and arrives in staging buffers outside the KV cache. Sized only by
        # the KV cache's fraction of memory they ran a decode GPU out of memory on long prompts,
        # so a split worker keeps cache.handoff_buffer_gib out of its cache and never stages more
        # than that at once (ranks/handoff.py).
        # With router.pulls, an aggregated worker sends and receives pulled blocks the same way.
        moves_kv = role in ("prefill", "decode") or cfg.router.pulls
        staging_budget = int(cfg.cache.handoff_buffer_gib * (1 << 30)) if moves_kv else 0
        self.engine = Engine.from_config(cfg, device, staging_bytes=staging_budget)
        # Collective over the world: the router creates its reader at the same point.
        self.window = CacheWindow.create(world, self.engine.load().total_blocks, role,
                                         host_blocks=self.engine.host_blocks)
        self.engine.watch_cache(self.window.on_cache, lambda block_id, block_hash: self.window.on_evict(block_hash))
        if self.engine.host_blocks:
            self.engine.watch_host(self.window.on_host_add, self.window.on_host_drop)
        # Collective over the workers (NCCL bootstrap on GPUs).
        self.transport = make_transport(workers, device)
        self.outbox = Outbox(world)
        self.handoffs = Handoffs(self.engine, self.transport, self.outbox, world.rank, staging_budget)
        self.pulls = Pulls(self.engine, self.handoffs, self.outbox, cfg.cache.block_size, self._add_request)
        self.decode_rank: dict[str, int] = {}  # request id -> where it decodes (prefill worker)
        self.step_wall_s = 0.0  # wall time inside engine steps
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
            busy |= self.pulls.progress()
            busy |= self.handoffs.progress()
            if self.engine.has_work():
                t0 = time.perf_counter()
                out = self.engine.step()
                self._send_step(out)
                self.step_wall_s += time.perf_counter() - t0
                busy = True
            self.window.publish(**asdict(self.engine.load()))
            if self.shutdown and not (self.engine.has_work() or self.handoffs.busy() or self.pulls.busy()):
                break
            if busy:
                nap = IDLE_SLEEP_S
            else:
                time.sleep(nap)
                nap = min(2 * nap, IDLE_SLEEP_MAX_S)
        stats = {"rank": self.world.rank, "role": self.role, **self.engine.report(), **vars(self.handoffs.stats),
                 **vars(self.pulls.stats),
                 "step_wall_s": self.step_wall_s}
        self.outbox.send(Stats(stats), ROUTER)
        self.outbox.flush()

    def _add_request(self, request: Request) -> None:
        self.engine.add_request(request, handoff=request.request_id in self.decode_rank)

    def _send_step(self, out: StepOutput) -> None:
        for result in out.finished:
            self.outbox.send(Result(result), ROUTER)
        for request_id in out.first_tokens:
            self.outbox.send(Prefilled(request_id), ROUTER)
        for state in out.handoffs:
            self.handoffs.start(state, self.decode_rank.pop(state.request_id))
            self.outbox.send(Prefilled(state.request_id), ROUTER)

    def _dispatch(self, tag, src: int, msg) -> None:
        if isinstance(msg, Assign):
            if msg.decode_rank is not None:
                self.decode_rank[msg.request.request_id] = msg.decode_rank
            if msg.pull_from is not None:
                self.pulls.start(msg.request, msg.pull_from, msg.pull_blocks)
            elif not self.pulls.hold(msg.request):
                self._add_request(msg.request)
        elif isinstance(msg, Pull):
            self.pulls.on_pull(src, msg)
        elif isinstance(msg, Pulled):
            self.pulls.on_pulled(src, msg)
        elif isinstance(msg, Handoff):
            self.handoffs.on_handoff(src, msg)
        elif isinstance(msg, Ready):
            self.handoffs.on_ready(src, msg)
        elif isinstance(msg, Shutdown):
            self.shutdown = True
        else:
            raise RuntimeError(f"worker got an unexpected {tag.name} message from rank {src}")
