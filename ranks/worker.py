"""Worker rank: one engine on one device, serving the router; prefill, decode or aggregated.
Under tensor parallelism this is the group's leader: it runs the engine on its shard and tells
the group's other ranks (ranks/follower.py) every step; to the router it is the whole worker.

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
import torch
from mpi4py import MPI

from kvrelay.configs.schema import JobConfig
from kvrelay.core.layout import Layout
from kvrelay.ranks.engine.engine import Engine, StepOutput
from kvrelay.ranks.engine.parallel import TPGroup
from kvrelay.ranks.engine.step_sync import StepSync
from kvrelay.ranks.handoff import Handoffs
from kvrelay.ranks.kv_link import GroupLink
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
    def __init__(self, cfg: JobConfig, world: MPI.Comm, workers: MPI.Comm, role: str, device: torch.device,
                 layout: Layout, tp: TPGroup, sync: StepSync | None):
        self.world = world
        self.role = role
        self.sync = sync  # None for a worker of one rank
        # NOTE: packed KV leaves and arrives in staging buffers outside the KV cache. Sized only by
        # the KV cache's fraction of memory they ran a decode GPU out of memory on long prompts,
        # so a split worker keeps cache.handoff_buffer_gib out of its cache and never stages more
        # than that at once (ranks/handoff.py).
        # With router.pulls, an aggregated worker sends and receives pulled blocks the same way.
        moves_kv = role in ("prefill", "decode") or cfg.router.pulls
        staging_budget = int(cfg.cache.handoff_buffer_gib * (1 << 30)) if moves_kv else 0
        self.engine = Engine.from_config(cfg, device, staging_bytes=staging_budget, tp=tp, sync=sync)
        # Collective over the world: the router creates its reader at the same point.
        self.window = CacheWindow.create(world, self.engine.load().total_blocks, role,
                                         host_blocks=self.engine.host_blocks, disk_blocks=self.engine.disk_blocks)
        self.engine.watch_cache(self.window.on_cache, lambda block_id, block_hash: self.window.on_evict(block_hash))
        if self.engine.host_blocks:
            self.engine.watch_host(self.window.on_host_add, self.window.on_host_drop)
        if self.engine.disk_blocks:
            self.engine.watch_disk(self.window.on_disk_add, self.window.on_disk_drop)
        # Collective over the workers (NCCL bootstrap on GPUs).
        self.transport = make_transport(workers, device)
        self.outbox = Outbox(world)
        link = None
        if layout.sharded and not cfg.sim.enabled:
            # A handoff or a pull between groups: each rank moves its own shard (ranks/kv_link.py).
            # A simulated transfer's payload is its block count, sent by the leaders alone.
            link = GroupLink(self.engine, self.transport, world.rank, tp.size, lambda r: layout.group_of(r)[2],
                             self.engine.runner.spec.num_kv_heads, sync)
        self.handoffs = Handoffs(self.engine, self.transport, self.outbox, world.rank, staging_budget, link=link)
        self.tp = sync.size if sync is not None else 1
        self.pulls = Pulls(self.engine, self.handoffs, self.outbox, cfg.cache.block_size, self._add_request,
                           from_host=layout.pulls_from_host(cfg.cache.host_kv_gib, cfg.sim.enabled))
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
            self.window.publish(self.engine.load())
            if self.shutdown and not (self.engine.has_work() or self.handoffs.busy() or self.pulls.busy()):
                break
            if busy:
                nap = IDLE_SLEEP_S
            else:
                time.sleep(nap)
                nap = min(2 * nap, IDLE_SLEEP_MAX_S)
        if self.sync is not None:
            self.sync.stop()  # the group's other ranks leave their loops
        stats = {"rank": self.world.rank, "role": self.role, "tp": self.tp, **self.engine.report(),
                 **vars(self.handoffs.stats), **vars(self.pulls.stats), **self.window.drops(),
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
