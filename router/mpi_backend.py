"""MPIBackend: the router's view of the worker ranks. Places each request, sends it, and collects
results; the frontend (router/frontend.py) drives it exactly as it drives an in-process engine.

Placement reads every worker's window with passive one-sided gets: the load headers before
every decision, and a copy of the cached-block tables (`TableSnapshot`) when the last copy is
older than router.window_max_age_ms. It adds the router's own books of what it sent and has not
heard back about (router/books.py: load, and the prefixes placed but not yet in any window), which
are current where the windows lag. With router.pulls, a request may go to a worker that pulls its
prefix from another worker's cache (router/pulls.py). Times are kept apart: hashing the prompt's blocks, reading
windows, and the decision itself (probing the copy and the books, the policy).
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
from mpi4py import MPI

from kvrelay.configs.schema import JobConfig
from kvrelay.core.layout import Layout
from kvrelay.core.timing import load_timing
from kvrelay.core.messages import Assign, Outbox, Shutdown, Tag, poll
from kvrelay.core.window import TableSnapshot, WindowReader
from kvrelay.core.block_hash import block_hashes, num_blocks
from kvrelay.router.books import Books, leading_blocks
from kvrelay.router.frontend import percentiles
from kvrelay.router.placement import WorkerState, make_decode_policy, make_policy
from kvrelay.router.pulls import PULL_KEYS, PullPlanner
from kvrelay.core.request import Request, RequestResult

IDLE_SLEEP_S = 0.0002
# A table refresh waits at least this many times the last one's duration (see the NOTE in submit).
READ_SPACING = 4
TIER_KEYS = ("gpu_hit_tokens", "host_hit_tokens", "host_offload_bytes", "host_onload_bytes", "disk_hit_tokens",
             "disk_write_bytes", "disk_read_bytes", "disk_failed_reads")
STATS_TIMEOUT_S = 60.0


class MPIBackend:
    def __init__(self, cfg: JobConfig, world: MPI.Comm, layout: Layout, hash_seed: int) -> None:
        self.world = world
        self.layout = layout
        self.block_size = cfg.cache.block_size
        self.hash_seed = hash_seed
        # Collective over the world: each worker creates its window at the same point.
        self.reader = WindowReader.create(world, layout.workers)
        self.outbox = Outbox(world)
        self.policy = make_policy(cfg.router, self.block_size)
        # A block in a worker's host or disk tier is credited by what it saves (timing model), not as a GPU block.
        timing = load_timing(cfg)
        self.tier_credit = partial(timing.tier_credit, self.block_size) if self.reader.host_buckets else None
        self.decode_policy = make_decode_policy(cfg.router)
        # Conditional disaggregation: the decode worker that would prefill a request locally is
        # chosen as an aggregated worker would be (cached prefix against prefill and decode load).
        self.local_prefill_max_tokens = cfg.router.local_prefill_max_tokens
        self.local_policy = make_policy(cfg.router, self.block_size)
        self.local_prefills = 0
        self.states = {
            r: WorkerState(rank=r, role=layout.role(r), total_blocks=0, free_blocks=0, queued_prefill_tokens=0,
                           running_seqs=0, active_decode_blocks=0)
            for r in layout.workers
        }
        # Requests that prefill: aggregated workers, else prefill workers.
        self.entry = layout.ranks("prefill") + layout.ranks("aggregated")
        self.decoders = layout.ranks("decode")
        pull_credit = partial(timing.pull_credit, self.block_size, overhead_s=cfg.router.pull_overhead_ms / 1e3)
        self.pulls = PullPlanner(pull_credit, self.entry, cfg.router.pull_min_blocks) if cfg.router.pulls else None
        self.pulls_from_host = layout.pulls_from_host(cfg.cache.host_kv_gib, cfg.sim.enabled)  # as the workers decide
        self.books = Books(self.states)
        self.status = MPI.Status()
        self.max_age_s = cfg.router.window_max_age_ms / 1e3
        self.snapshot: TableSnapshot | None = None
        self.snapshot_time = 0.0
        self.last_read_s = 0.0
        self.hash_s: list[float] = []
        self.read_s: list[float] = []  # load headers, and the tables when refreshed, per decision
        self.header_read_s: list[float] = []  # the load headers alone
        self.table_read_s: list[float] = []  # each table refresh alone
        self.decision_s: list[float] = []
        # Cached blocks the window showed: on the best worker, and on the chosen one (summed);
        # blocks the chosen worker was credited with beyond its window, from the books (summed).
        self.seen_cached_blocks = 0
        self.placed_cached_blocks = 0
        self.placed_inflight_blocks = 0
        # Requests placed away from the worker worth the most to them (its prefix's holder): how
        # many, the worth they left there (GPU blocks), and how far the holder's prefill queue was
        # ahead of the chosen worker's (blocks), which is what outweighed the hit.
        self.off_holder = 0
        self.off_holder_worth = 0.0
        self.off_holder_queue_ahead: list[float] = []
        self.samples_left: dict[str, int] = {}  # request id -> samples whose result has not come
        self.max_inflight_prefix_blocks = 0

    def submit(self, request: Request) -> None:
        t0 = time.perf_counter()
        self.samples_left[request.request_id] = request.sampling.best_of
        ids = request.prompt_token_ids
        nblocks = num_blocks(len(ids), self.block_size)
        hash_list = block_hashes(ids, self.block_size, self.hash_seed)
        hashes = np.array(hash_list, dtype=np.uint64)
        t1 = time.perf_counter()
        self._refresh_loads()
        self.header_read_s.append(time.perf_counter() - t1)
        inflight = self.books.prefixes
        # NOTE: the copy is re-read when older than router.window_max_age_ms and than READ_SPACING x
        # the last read's time, so reading never takes more than ~1/READ_SPACING of the router's
        # time. With GPU tables of 256 KiB (6k blocks) a refresh of 16 workers took 7-9 ms p50 on a
        # loaded 2-core machine; at W=16's ~37 decisions a second every decision refreshed and the
        # router fell behind by seconds (B2 with placement that keeps conversations). A longer age
        # costs little: the books credit what the router placed until a refresh shows it.
        if self.snapshot is None or t1 - self.snapshot_time > max(self.max_age_s, READ_SPACING * self.last_read_s):
            t = time.perf_counter()
            retiring, inflight.retiring = inflight.retiring, []
            self.snapshot = self.reader.snapshot()
            self.snapshot_time = time.perf_counter()
            inflight.drop_retired(retiring)
            self.last_read_s = self.snapshot_time - t
            self.table_read_s.append(self.last_read_s)
        t2 = time.perf_counter()
        # Per worker: leading blocks its window shows, those it holds (window or books), and their
        # worth in GPU blocks (host-tier hits count less): one numpy probe of the table copies and
        # one walk of the books for all workers, which every decision needs.
        tiers: dict[int, tuple[int, int, int]] = {}
        window, cached, worth = leading_blocks(self.snapshot, inflight, hashes, hash_list, self.tier_credit, tiers)
        gpu: dict[int, int] = {}  # leading blocks in each GPU cache (pull sources)
        host: dict[int, int] | None = None  # and the host tier's run past them, where sources send from there
        if self.pulls is not None:  # a worker is also worth what it could pull from another
            gpu = {r: t[0] for r, t in tiers.items()} if self.snapshot.host_groups else window
            if self.pulls_from_host and self.snapshot.host_groups:
                host = {r: t[1] for r, t in tiers.items()}
            worth = {r: v + self.pulls.worth(r, cached[r], gpu, host) for r, v in worth.items()}

        def uncached_tokens(r: int) -> int:  # what worker r must compute: at least the last token
            return len(ids) - min(cached[r] * self.block_size, len(ids) - 1)

        def choose(policy, candidates: list[int]) -> int:
            return policy.choose([self.states[r] for r in candidates], nblocks, worth.__getitem__,
                                 max(worth[r] for r in candidates))

        rank = decode = None
        if self.decoders and self.local_prefill_max_tokens > 0:
            local = choose(self.local_policy, self.decoders)
            if uncached_tokens(local) <= self.local_prefill_max_tokens:
                rank = local
                self.local_prefills += 1
        if rank is None:
            rank = choose(self.policy, self.entry)
            if self.layout.role(rank) == "prefill":
                decode = self.decode_policy.choose([self.states[r] for r in self.decoders], nblocks, lambda r: 0)
        holder = max(self.entry, key=worth.__getitem__)
        if worth[holder] > worth[rank]:
            self.off_holder += 1
            self.off_holder_worth += worth[holder] - worth[rank]
            self.off_holder_queue_ahead.append(self.states[holder].queued_prefill_blocks(self.block_size)
                                               - self.states[rank].queued_prefill_blocks(self.block_size))
        # The worker's queue grows by what it must compute, not by what it has cached or pulls.
        tokens = uncached_tokens(rank)
        pull = None
        if self.pulls is not None:
            pull = self.pulls.source(rank, cached[rank], gpu, host)
            if pull is not None:
                tokens = len(ids) - min(pull[1] * self.block_size, len(ids) - 1)
                self.pulls.place(request.request_id, pull[0], rank, pull[1])
        if window:
            self.seen_cached_blocks += max(window.values())
            self.placed_cached_blocks += window[rank]
            self.placed_inflight_blocks += cached[rank] - window[rank]
        self.hash_s.append(t1 - t0)
        self.read_s.append(t2 - t1)
        self.decision_s.append(time.perf_counter() - t2)
        self.outbox.send(Assign(request, decode, *(pull or (None, 0))), rank)
        self.books.place(request.request_id, rank, decode, tokens, nblocks, hash_list)
        self.max_inflight_prefix_blocks = max(self.max_inflight_prefix_blocks, len(inflight))

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV that the smallest worker cache holds, from the window headers (a worker
        publishes its total blocks after its first loop turn: wait for every one)."""
        deadline = time.monotonic() + STATS_TIMEOUT_S
        self._refresh_loads()
        while not all(s.total_blocks for s in self.states.values()):
            if time.monotonic() > deadline:
                missing = sorted(r for r, s in self.states.items() if not s.total_blocks)
                raise RuntimeError(f"workers {missing} published no load header in {STATS_TIMEOUT_S:.0f} s")
            time.sleep(IDLE_SLEEP_S)
            self._refresh_loads()
        return min(s.total_blocks for s in self.states.values()) * self.block_size

    def poll(self) -> list[RequestResult]:
        self.outbox.progress()
        results = []
        while (msg := poll(self.world, self.status)) is not None:
            tag, src, payload = msg
            if tag is Tag.RESULT:
                result = payload.result
                # A request with best_of samples leaves the books with its last sample's result.
                left = self.samples_left.pop(result.request_id) - 1
                if left:
                    self.samples_left[result.request_id] = left
                else:
                    self.books.finished(result.request_id, src)
                if self.pulls is not None:
                    self.pulls.done(result.request_id)
                results.append(result)
            elif tag is Tag.PREFILLED:
                self.books.prefilled(payload.request_id)
                if self.pulls is not None:
                    self.pulls.done(payload.request_id)
            else:
                raise RuntimeError(f"router got an unexpected {tag.name} message from rank {src}")
        if not results:
            time.sleep(IDLE_SLEEP_S)
        return results

    def _refresh_loads(self) -> None:
        for rank, header in self.reader.loads().items():
            s, load = self.states[rank], header.load
            s.total_blocks, s.free_blocks = load.total_blocks, load.free_blocks
            s.queued_prefill_tokens, s.running_seqs = load.queued_prefill_tokens, load.running_seqs
            s.active_decode_blocks = load.active_decode_blocks

    def stats(self) -> dict:
        """End of the job: stop every worker and gather its counters."""
        for r in self.layout.workers:
            self.outbox.send(Shutdown(), r)
        workers = {}
        deadline = time.monotonic() + STATS_TIMEOUT_S
        while len(workers) < len(self.layout.workers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(set(self.layout.workers) - set(workers))} did not report")
            msg = poll(self.world, self.status)
            if msg is None:
                self.outbox.progress()
                time.sleep(IDLE_SLEEP_S)
                continue
            tag, src, payload = msg
            if tag is not Tag.STATS:
                raise RuntimeError(f"router got {tag.name} from rank {src} after the last result")
            workers[src] = payload.counters
        self.outbox.flush()
        sent = sum(w["handoff_bytes"] for w in workers.values())
        secs = sum(w["handoff_seconds"] for w in workers.values())
        def us(values: list[float]) -> dict:
            return {k: (v * 1e6 if v is not None else None) for k, v in percentiles(values, (50, 99)).items()}

        return {
            "layout": self.layout.describe(),
            "policy": type(self.policy).__name__,
            "workers": [workers[r] for r in sorted(workers)],
            "handoff_bytes": sent,
            # Prefix hits per tier (tokens) and the host and disk tiers' traffic, over all workers.
            **{k: sum(w.get(k, 0) for w in workers.values()) for k in TIER_KEYS},
            "local_prefills": self.local_prefills,
            # Pulls between workers (router.pulls): planned here, and what the pullers got.
            "pulls_planned": self.pulls.planned if self.pulls is not None else 0,
            "pull_planned_blocks": self.pulls.planned_blocks if self.pulls is not None else 0,
            **{k: sum(w.get(k, 0) for w in workers.values()) for k in PULL_KEYS},
            "handoff_gb_per_s": sent / secs / 1e9 if secs else None,
            "decision_us": us(self.decision_s),
            "hash_us": us(self.hash_s),
            "window_read_us": us(self.read_s),
            "header_read_us": us(self.header_read_s),
            "table_read_us": us(self.table_read_s),
            "table_reads": len(self.table_read_s),
            "window_cached_blocks_best": self.seen_cached_blocks,
            "window_cached_blocks_placed": self.placed_cached_blocks,
            "inflight_cached_blocks_placed": self.placed_inflight_blocks,
            "inflight_prefix_blocks_max": self.max_inflight_prefix_blocks,
            "off_holder_requests": self.off_holder,
            "off_holder_worth_blocks": self.off_holder_worth,
            "off_holder_queue_ahead_blocks": percentiles(self.off_holder_queue_ahead, (10, 50, 90)),
        }

    def close(self) -> None:
        self.reader.close()
