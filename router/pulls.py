"""The router's side of pulls (router.pulls): which worker a request's prefix may be pulled from,
what that is worth to placement, and which pulls are in flight. Plain ints and dicts.

A worker that holds fewer of a prompt's leading blocks than another worker's GPU cache can pull
the difference from it (ranks/pulls.py) instead of computing it. Placement (kv_aware) credits a
candidate with the blocks it could pull, each worth what it saves (its recompute time less its
transfer time, from the timing model: `TimingModel.pull_credit`), so a request whose prefix sits
on a busy worker can go to an idle one that pulls the prefix: the cache no longer pins the work to
its holder. Once placed, the request's Assign names the source and the block count.

A source is a worker whose cached prefix (GPU window, not the router's books: blocks in flight are
not computed yet) is at least `router.pull_min_blocks` longer than what the chosen worker holds
(window or books). Only entry workers (aggregated, prefill) pull and serve: decode workers take
handoffs from prefill workers, and a pull against that direction would share their pair.

NOTE (one direction per pair): on GPUs a pair of workers shares one NCCL communicator and stream
(ranks/transport.py), whose operations run in posting order. Transfers in both directions between
two workers at once can each wait for the other's receive behind their own (each side posts its
receive before its send), a deadlock. So no pull from A to B is planned while one from B to A is in
flight; a pull ends, for the router, with its request's PREFILLED (or RESULT), which B sends only
after the blocks landed.
"""

from __future__ import annotations

from collections.abc import Callable

PULL_KEYS = ("pulls", "pulled_blocks", "pulled_bytes", "pull_missing_blocks", "pull_padded_blocks", "pull_seconds",
             "served_blocks", "served_host_blocks")

PullCredit = Callable[..., float]  # (own blocks, pulled blocks, host_blocks=of them from a host tier) -> worth in recomputed blocks


class PullPlanner:
    def __init__(self, credit: PullCredit, ranks: list[int], min_blocks: int) -> None:
        assert min_blocks >= 1
        self.credit = credit
        self.ranks = set(ranks)  # workers that may pull and serve
        self.min_blocks = min_blocks
        self.flows: dict[tuple[int, int], int] = {}  # (source, puller) -> pulls in flight
        self.inflight: dict[str, tuple[int, int]] = {}  # request id -> (source, puller)
        self.planned = 0
        self.planned_blocks = 0

    def source(self, rank: int, own: int, gpu: dict[int, int], host: dict[int, int] | None = None
               ) -> tuple[int, int] | None:
        """(source, n): the worker whose GPU cache, continued by its host tier's run past it
        (`host`, where sources send from their host tiers), holds the longest prefix (n leading
        blocks) that `rank`, holding `own`, may pull from; None if none is `min_blocks` ahead, the
        pull saves nothing, or only sources with a pull from `rank` in flight are (see the NOTE)."""
        if rank not in self.ranks:
            return None
        best = None
        for r, g in gpu.items():
            n = g + (host.get(r, 0) if host else 0)
            if r == rank or r not in self.ranks or self.flows.get((rank, r)) or n - own < self.min_blocks:
                continue
            if best is None or n > best[1]:
                best = (r, n)
        if best is None or self._credit(own, best, gpu) <= 0:
            return None
        return best

    def worth(self, rank: int, own: int, gpu: dict[int, int], host: dict[int, int] | None = None) -> float:
        """What `rank` could pull is worth, in recomputed blocks (0 without a source)."""
        src = self.source(rank, own, gpu, host)
        return self._credit(own, src, gpu) if src is not None else 0.0

    def _credit(self, own: int, src: tuple[int, int], gpu: dict[int, int]) -> float:
        r, n = src
        return self.credit(own, n - own, host_blocks=n - max(own, gpu[r]))  # those past the source's GPU run

    def place(self, request_id: str, source: int, rank: int, num_blocks: int) -> None:
        """The request goes to `rank` and pulls its first `num_blocks` blocks from `source`."""
        key = (source, rank)
        self.flows[key] = self.flows.get(key, 0) + 1
        self.inflight[request_id] = key
        self.planned += 1
        self.planned_blocks += num_blocks

    def done(self, request_id: str) -> None:
        """The request's prompt is computed (or it finished): its pull, if any, is over."""
        key = self.inflight.pop(request_id, None)
        if key is not None:
            self.flows[key] -= 1
            if not self.flows[key]:
                del self.flows[key]
