"""The router's books: what it placed on each worker and has not heard back about yet.

The one place where the router's load accounting changes. router/mpi_backend.py calls `place`
when it sends a request, `prefilled` on the worker's PREFILLED message and `finished` on its
RESULT; the counts land in each worker's `WorkerState.inflight_*` fields, which placement reads
beside the (lagging) window header (the max of the two, see `WorkerState`).

The books also hold the prefixes in flight (`InflightPrefixes`): the block hashes of requests
placed on a worker whose window does not show them yet, so that the next line with the same
prefix is credited with them at once rather than one window refresh and one prefill later.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate, takewhile
from operator import and_, neg

import numpy as np

from kvrelay.core.window import TableSnapshot
from kvrelay.router.placement import WorkerState


@dataclass
class Placed:
    """One request the router sent and has no result for."""

    rank: int  # the worker that prefills it (and decodes it, when `decode` is None)
    decode: int | None  # its decode worker in a split layout
    tokens: int  # uncached prompt tokens queued for prefill on `rank`; 0 once prefilled
    nblocks: int  # the prompt's blocks: what it holds on the worker that decodes it
    # Prefix blocks this request put in flight, per worker: (rank, hashes no earlier request there had).
    owns: list[tuple[int, list[int]]] = field(default_factory=list)


class InflightPrefixes:
    """Block hashes placed on workers and not yet shown by their windows, as one dict from hash
    to a bit mask of workers, so the leading in-flight blocks of a prompt on every worker cost one
    dict lookup per block (in C), up to the block where no worker has it (one for a new prefix).

    NOTE (lifetime and bound): a request's blocks enter when it is placed. The request that first
    brought a block to a worker owns it there; when that request's prompt is computed (PREFILLED,
    or RESULT when none came), its blocks are registered in the worker's pool and published, so
    they leave this table at the next window refresh that starts after that message (`retire` then
    `drop_retired`): from then on the window answers for them, and a worker that evicts them stops
    showing them, so an eviction is never hidden by this table. The decode worker of a split
    layout registers a prompt's blocks when its KV arrives, so its entries wait for the RESULT.
    The table therefore holds at most the prompt blocks of the requests in flight
    (router.max_inflight), each once per worker.
    """

    def __init__(self, ranks: list[int]) -> None:
        self.bit = {r: 1 << i for i, r in enumerate(ranks)}
        self.rank_of_bit = {b: r for r, b in self.bit.items()}
        self.masks: dict[int, int] = {}  # block hash -> workers it is in flight on
        self.retiring: list[tuple[int, list[int]]] = []  # (rank, hashes) to drop at the next refresh

    def __len__(self) -> int:
        return len(self.masks)

    def add(self, rank: int, hashes: list[int]) -> list[int]:
        """Credit `rank` with `hashes`; returns those it did not have (the caller owns them)."""
        bit = self.bit[rank]
        masks = self.masks
        new = [h for h in hashes if not masks.get(h, 0) & bit]
        for h in new:
            masks[h] = masks.get(h, 0) | bit
        return new

    def prefix_lengths(self, hashes: list[int]) -> dict[int, int]:
        """Leading `hashes` in flight on each worker that has at least the first one."""
        # NOTE: the walk runs in C (map, accumulate, takewhile): run[i] is the mask of the workers
        # that hold hashes[0..i], ending before the first block no worker holds to there. Each
        # mask is a subset of the one before, hence numerically no larger: the blocks where a
        # worker drops out are found by bisection, one per distinct mask (few: workers drop out
        # in groups), never by a Python step per block.
        run = list(takewhile(bool, accumulate(takewhile(bool, map(self.masks.get, hashes)), and_)))
        out: dict[int, int] = {}
        i = 0
        while i < len(run):
            alive = run[i]
            i = bisect_right(run, -alive, lo=i, key=neg)  # past the last block this mask holds
            gone = alive & ~run[i] if i < len(run) else alive
            while gone:
                low = gone & -gone
                out[self.rank_of_bit[low]] = i
                gone ^= low
        return out

    def retire(self, owned: list[tuple[int, list[int]]]) -> None:
        self.retiring.extend(owned)

    def drop_retired(self, retiring: list[tuple[int, list[int]]]) -> None:
        """Forget blocks the window now answers for: those retired before the refresh began."""
        masks = self.masks
        for rank, hashes in retiring:
            keep = ~self.bit[rank]
            for h in hashes:
                m = masks.get(h, 0) & keep
                if m:
                    masks[h] = m
                else:
                    masks.pop(h, None)


TierCredit = Callable[[int, int, int], float]  # (GPU blocks, host blocks after them, disk blocks after those) -> worth


def leading_blocks(snapshot: TableSnapshot, prefixes: InflightPrefixes, hashes: np.ndarray,
                   hash_list: list[int], tier_credit: TierCredit | None = None,
                   tiers: dict[int, tuple[int, int, int]] | None = None
                   ) -> tuple[dict[int, int], dict[int, int], dict[int, float]]:
    """Per worker, a prompt's leading blocks that its window shows (GPU, then host, then disk
    tier), those that it holds by the window or by the books, and what those are worth in GPU
    blocks (GPU hits and blocks in flight 1 each, a run of h host and d disk blocks after g GPU
    ones `tier_credit(g, h, d)`; 1 each without `tier_credit`). `hashes` as [n] uint64 and as a
    list: the two probes want both. `tiers`, if given, receives each worker's (g, h, d) (where
    the windows have host tables)."""
    if snapshot.host_groups:  # a disk tier sits below a host tier: no host tables, no lower tiers
        per_tier = snapshot.tier_lengths(hashes)
        if tiers is not None:
            tiers.update(per_tier)
        window = {r: sum(t) for r, t in per_tier.items()}
        worth = {r: g + (tier_credit(g, h, d) if tier_credit else h + d) for r, (g, h, d) in per_tier.items()}
    else:
        window, worth = snapshot.prefix_lengths(hashes), None  # every held block is worth 1
    cached = dict(window)
    inflight = prefixes.prefix_lengths(hash_list)
    for rank, n in inflight.items():
        cached[rank] = max(n, window[rank])
    if worth is None:
        return window, cached, cached
    for rank, n in inflight.items():
        worth[rank] = max(n, worth[rank])
    return window, cached, worth


class Books:
    def __init__(self, states: dict[int, WorkerState]) -> None:
        self.states = states  # rank -> state; the books write its inflight_* fields
        self.placed: dict[str, Placed] = {}
        self.prefixes = InflightPrefixes(sorted(states))

    def __len__(self) -> int:
        return len(self.placed)

    def place(self, request_id: str, rank: int, decode: int | None, tokens: int, nblocks: int,
              hashes: list[int]) -> None:
        """`hashes`: the prompt's full-block hashes, credited to the worker(s) that will cache them."""
        p = Placed(rank, decode, tokens, nblocks)
        self.placed[request_id] = p
        self._entry(p, +1)
        p.owns.append((rank, self.prefixes.add(rank, hashes)))
        if decode is not None:
            self._decoder(p, +1)
            p.owns.append((decode, self.prefixes.add(decode, hashes)))

    def prefilled(self, request_id: str) -> None:
        """The prompt left `rank`'s prefill queue: aggregated, it decodes on there; split, its KV is
        on the way to the decode worker and the prefill worker is done with it."""
        p = self.placed[request_id]
        if p.decode is None:
            self.states[p.rank].inflight_prefill_tokens -= p.tokens
        else:
            self._entry(p, -1)
        p.tokens = 0
        self._retire(p, p.rank)

    def finished(self, request_id: str, src: int) -> Placed:
        """The result came from rank `src`; the request leaves the books."""
        p = self.placed.pop(request_id)
        self._retire(p, None)
        if p.decode is None:
            self._entry(p, -1)
        else:
            self._decoder(p, -1)
            if src == p.rank:  # finished on the prefill side (its first token ended it)
                self._entry(p, -1)
        return p

    def _retire(self, p: Placed, rank: int | None) -> None:
        """Hand the request's in-flight blocks on `rank` (all, for None) to the window."""
        self.prefixes.retire([o for o in p.owns if rank is None or o[0] == rank])
        p.owns = [o for o in p.owns if rank is not None and o[0] != rank]

    def _entry(self, p: Placed, sign: int) -> None:
        s = self.states[p.rank]
        s.inflight_requests += sign
        s.inflight_prefill_tokens += sign * p.tokens
        if p.decode is None:
            s.inflight_decode_blocks += sign * p.nblocks

    def _decoder(self, p: Placed, sign: int) -> None:
        d = self.states[p.decode]
        d.inflight_requests += sign
        d.inflight_decode_blocks += sign * p.nblocks
