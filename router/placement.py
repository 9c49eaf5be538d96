"""Placement: which worker runs a request. The router's policies, on plain ints and lists.

The caller (router/mpi_backend.py) reads every worker's window header into a `WorkerState`, adds
its own books of what it sent and has not heard back about, and calls `choose` once for the
prefill (or aggregated) candidates with `make_policy`, and once more for the decode candidates
with `make_decode_policy`. `cached_blocks(rank)` is a window read of one worker's cached-block
table; policies call it only when the answer can change the choice.

Ties never go by rank order (that piles work on the first worker): they go to the less loaded
worker, then to a seeded random choice, so a rerun with the same seed places the same way.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvrelay.configs.schema import RouterSection


@dataclass
class WorkerState:
    rank: int
    role: str  # "aggregated" | "prefill" | "decode"
    total_blocks: int
    free_blocks: int  # from the worker's window header (may lag)
    queued_prefill_tokens: int  # from the window (may lag)
    running_seqs: int
    active_decode_blocks: int
    # The router's own up-to-date books (what it sent and has not heard back about):
    inflight_requests: int = 0
    inflight_prefill_tokens: int = 0  # uncached prompt tokens sent here whose prefill is not confirmed
    inflight_decode_blocks: int = 0  # blocks of requests decoding here (router's estimate)

    # NOTE: each load below is the max of the window's view and the router's books, never the sum.
    # Both count the same work: a request enters the worker's queue only after the router sent it,
    # and leaves the router's books only after its PREFILLED or RESULT message arrives, which is
    # after it left the queue. So the books are the fresher superset (the window lags, and a burst
    # placed between two refreshes is only in the books); a sum would count that work twice. The
    # max keeps the window as a floor for work the books could miss.

    def queued_prefill_blocks(self, block_size: int) -> int:
        return -(-max(self.queued_prefill_tokens, self.inflight_prefill_tokens) // block_size)

    @property
    def decode_blocks(self) -> int:
        return max(self.active_decode_blocks, self.inflight_decode_blocks)

    @property
    def load(self) -> int:
        """Requests on this worker: the first tie break."""
        return max(self.inflight_requests, self.running_seqs)


class Policy(Protocol):
    def choose(self, workers: list[WorkerState], num_prompt_blocks: int, cached_blocks: Callable[[int], int],
               most_cached: float | None = None) -> int:
        """The rank to run a request of `num_prompt_blocks` blocks; `cached_blocks(rank)` is the
        number of its leading blocks cached on that worker (a window read, a few us each);
        `most_cached`, where the caller knows it, is at least cached_blocks of every worker given."""
        ...


def _argmin(scored: list[tuple[tuple, WorkerState]], rng: random.Random) -> int:
    """Rank of the lowest key; equal keys go to a seeded random choice, never to rank order."""
    best = min(key for key, _ in scored)
    ties = [w.rank for key, w in scored if key == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


class KvAware:
    """Dynamo's cost, lower is better, with the cache credit bounded by the request's own work:

        cost(w) = prefill_load_scale * (queued_prefill_blocks(w) + max(0, new - overlap_credit * cached(w))
                                        - cache_affinity * cached(w))
                  + decode_blocks(w)

    then the lower load, then seeded random. `cached(w)` counts the blocks the worker's window
    shows and those the router placed there and the window does not show yet (router/books.py).
    """

    # NOTE (defaults, tuned on B2 in BENCHMARKS.md): prefill_load_scale=16, overlap_credit=1.
    # The cost adds blocks of two kinds that cost very different time. A prefill block (64 tokens
    # of an 8B model on an H100) is ~2.2 ms of compute that the request waits for before its
    # first token; a decode block resident on the worker costs ~3.5 us per decode step, ~0.1 ms
    # over the half second of a typical TTFT. At scale 1 the decode blocks of the requests
    # already decoding (~1-2k per worker, differing by hundreds between workers) drowned the
    # cache credit (at most the request's ~190 blocks), and kv_aware placed no better than
    # least_loaded. On the Mooncake trace at W=8 (same load, one run each): scale 1 -> hit ratio
    # 0.061, TTFT p50 0.85 s; 4 -> 0.054, 0.73 s; 16 -> 0.071, 0.64 s; 64 -> 0.079, 0.66 s;
    # 16 with credit 2 -> 0.074, 0.65 s (round_robin 0.054, 1.69 s; least_loaded 0.045, 1.12 s).
    # Scales 16-64 are within run-to-run noise of each other; 16 is the smallest that gets there,
    # so decode load still separates workers whose prefill work is about equal. Credit 1 keeps a
    # hit worth exactly the compute it saves.

    # NOTE: Dynamo's form (README, Placement), scale * max(0, queued + new - credit * cached), lets
    # the credit eat the queue. The two forms agree while credit * cached <= new (always, for overlap_credit <= 1),
    # but with overlap_credit > 1 and a long hit, up to credit * cached - new queued blocks cost
    # nothing: the worker holding a shared system prompt looks idle while its queue grows, and
    # once several such workers sit at the max(0, ...) floor their queues no longer rank them at
    # all. Here the credit only discounts the request's own new blocks, so a worker's queue always
    # counts in full and a hit is worth at most `new` blocks. A cached worker c beats a worker o
    # only while scale * (queued_c - queued_o) + (decode_c - decode_o) <= scale * new, and each
    # request adds its work to the chosen worker's books, so a cached worker runs ahead of the
    # others by at most one request's blocks whatever the credit: the cache decides among workers
    # that are about as busy, and never outweighs a real queue.

    # NOTE (cache_affinity, batch files): with the terms above alone, a line whose prefix a busy
    # worker holds goes to an idle worker as soon as the holder's queue outweighs the compute the
    # hit saves; in a burst that is at once (a document's second question saw its first queued
    # on the holder and went elsewhere), so each document was computed on every worker (issue 14:
    # 0.482 = round_robin). That trade is right for a line waiting for its first token, wrong for
    # a batch whose other workers have other lines to run. cache_affinity A adds A blocks of the
    # holder's queue per cached block: a worker c holding p leading blocks of a line keeps it
    # against a worker o holding none while
    #     scale * (queued_c - queued_o) + (decode_c - decode_o) <= scale * (min(credit * p, new) + A * p)
    # i.e. (at credit 1) while c's prefill queue is less than (1 + A) * p blocks ahead. This is how
    # a hot prefix is replicated: once its holder is that far ahead of the least loaded worker,
    # the next line goes there and computes the prefix once more; from then on both hold it and
    # each line goes to the less loaded of them, and a third copy follows when both are (1 + A) * p
    # ahead of another worker. The queue still counts in full (no max(0, ...) floor), so the
    # imbalance the cache can buy is bounded by the prefix's size, never by the queue.
    # NOTE (cache_affinity, timed traces): the same default (4) since issue 15. Without it a
    # conversation's next turn left its holder as soon as the holder's queue was more than the
    # turn's history ahead (the hit saves that request's compute, nothing more), and its history
    # was computed again elsewhere: work added to a busy system that every later request waits
    # behind. On B2 at W=8 with a host tier, affinity 0 -> 4 raised the hit ratio 0.146 -> 0.189
    # at the same TTFT (BENCHMARKS, "B2 with placement that keeps conversations").
    # One exception: an idle worker (nothing in the books or its window) while another worker
    # holds more than half its fair share of router.max_inflight gets no affinity against it
    # (the plain cost decides). Without it a long hot prefix never reached some workers at all:
    # with max_inflight spread over W workers, a holder's lead stays below (1 + A) * p, and on
    # B6's few-shot file at W=16 two workers ran nothing. A burst's first lines do not trip it:
    # a document's questions are far fewer than half a worker's share of max_inflight.
    def __init__(self, prefill_load_scale: float, overlap_credit: float, block_size: int, seed: int,
                 cache_affinity: float = 0.0, max_inflight: int = 512) -> None:
        assert prefill_load_scale >= 0 and overlap_credit >= 0 and block_size > 0 and cache_affinity >= 0
        self.scale = prefill_load_scale
        self.credit = overlap_credit
        self.affinity = cache_affinity
        self.max_inflight = max_inflight
        self.block_size = block_size
        self.rng = random.Random(seed)

    def choose(self, workers: list[WorkerState], num_prompt_blocks: int, cached_blocks: Callable[[int], int],
               most_cached: float | None = None) -> int:
        assert workers, "no candidate workers"
        n = num_prompt_blocks
        scale, credit, affinity = self.scale, self.credit, self.affinity
        loads = [w.load for w in workers]
        if affinity and 2 * len(workers) * max(loads) > self.max_inflight and 0 in loads:
            affinity = 0.0  # an idle worker beside a busy one: see the NOTE above
        use_cache = scale > 0 and (credit > 0 or affinity > 0) and n > 0
        # Visit workers by the lowest cost they could reach with the best hit any worker has (the
        # same offset for all, so the order of their loads) and read the cache table only of
        # those that could still win or tie. NOTE: the bound matters with affinity: at the whole
        # prompt (`n`) it makes every worker's floor negative by A * n blocks, below any real
        # cost, so no worker was ever skipped.
        hit = n if most_cached is None else min(n, most_cached)
        full_hit = scale * (max(0.0, n - credit * hit) - affinity * hit) if use_cache else scale * n
        floors = sorted(
            ((scale * w.queued_prefill_blocks(self.block_size) + w.decode_blocks, i) for i, w in enumerate(workers)),
        )
        best = float("inf")
        scored = []
        for floor, i in floors:
            if floor + full_hit > best:
                break
            cached = min(cached_blocks(workers[i].rank), n) if use_cache else 0
            cost = floor + scale * (max(0.0, n - credit * cached) - affinity * cached)
            if cost < best:
                best = cost
            scored.append(((cost, loads[i]), workers[i]))
        return _argmin(scored, self.rng)


class LeastLoaded:
    """Fewest requests (inflight or running), ties random."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def choose(self, workers: list[WorkerState], num_prompt_blocks: int, cached_blocks: Callable[[int], int],
               most_cached: float | None = None) -> int:
        assert workers, "no candidate workers"
        return _argmin([((w.load,), w) for w in workers], self.rng)


class DecodeLeastLoaded:
    """Fewest decode blocks, then fewest requests, ties random: the decode side of kv_aware and
    least_loaded. Decode workers hold no prefix to reuse, so their prefill cost ties everywhere and
    only decode load separates them."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def choose(self, workers: list[WorkerState], num_prompt_blocks: int, cached_blocks: Callable[[int], int],
               most_cached: float | None = None) -> int:
        assert workers, "no candidate workers"
        return _argmin([((w.decode_blocks, w.load), w) for w in workers], self.rng)


class RoundRobin:
    """The next rank after the last one chosen, in rank order, wrapping; robust to a candidate
    list that changes between calls."""

    def __init__(self) -> None:
        self.last: int | None = None

    def choose(self, workers: list[WorkerState], num_prompt_blocks: int, cached_blocks: Callable[[int], int],
               most_cached: float | None = None) -> int:
        assert workers, "no candidate workers"
        ranks = sorted(w.rank for w in workers)
        self.last = next((r for r in ranks if self.last is None or r > self.last), ranks[0])
        return self.last


class RandomChoice:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def choose(self, workers: list[WorkerState], num_prompt_blocks: int, cached_blocks: Callable[[int], int],
               most_cached: float | None = None) -> int:
        assert workers, "no candidate workers"
        return self.rng.choice(workers).rank


_POLICIES: dict[str, Callable[[RouterSection, int], Policy]] = {
    "kv_aware": lambda cfg, bs: KvAware(cfg.prefill_load_scale, cfg.overlap_credit, bs, cfg.seed, cfg.cache_affinity,
                                        cfg.max_inflight),
    "least_loaded": lambda cfg, bs: LeastLoaded(cfg.seed),
    "round_robin": lambda cfg, bs: RoundRobin(),
    "random": lambda cfg, bs: RandomChoice(cfg.seed),
}

_DECODE_POLICIES: dict[str, Callable[[RouterSection], Policy]] = {
    "kv_aware": lambda cfg: DecodeLeastLoaded(cfg.seed),
    "least_loaded": lambda cfg: DecodeLeastLoaded(cfg.seed),
    "round_robin": lambda cfg: RoundRobin(),
    "random": lambda cfg: RandomChoice(cfg.seed),
}


def _unknown(name: str) -> ValueError:
    return ValueError(f"router.policy {name!r} is not a placement policy; allowed: {', '.join(_POLICIES)}")


def make_policy(cfg: RouterSection, block_size: int) -> Policy:
    """The policy for requests that start with a prefill (prefill or aggregated workers)."""
    if cfg.policy not in _POLICIES:
        raise _unknown(cfg.policy)
    return _POLICIES[cfg.policy](cfg, block_size)


def make_decode_policy(cfg: RouterSection) -> Policy:
    """The policy for decode workers: by decode load for kv_aware and least_loaded."""
    if cfg.policy not in _DECODE_POLICIES:
        raise _unknown(cfg.policy)
    return _DECODE_POLICIES[cfg.policy](cfg)
