"""The router's books: what it placed on each worker and has not heard back about yet.

The one place where the router's load accounting changes. router/mpi_backend.py calls `place`
when it sends a request, `prefilled` on the worker's PREFILLED message and `finished` on its
RESULT; the counts land in each worker's `WorkerState.inflight_*` fields, which placement reads
beside the (lagging) window header (the max of the two, see `WorkerState`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrelay.router.placement import WorkerState


@dataclass
class Placed:
    """One request the router sent and has no result for."""

    rank: int  # the worker that prefills it (and decodes it, when `decode` is None)
    decode: int | None  # its decode worker in a split layout
    tokens: int  # uncached prompt tokens queued for prefill on `rank`; 0 once prefilled
    nblocks: int  # the prompt's blocks: what it holds on the worker that decodes it


class Books:
    def __init__(self, states: dict[int, WorkerState]) -> None:
        self.states = states  # rank -> state; the books write its inflight_* fields
        self.placed: dict[str, Placed] = {}

    def __len__(self) -> int:
        return len(self.placed)

    def place(self, request_id: str, rank: int, decode: int | None, tokens: int, nblocks: int) -> None:
        p = Placed(rank, decode, tokens, nblocks)
        self.placed[request_id] = p
        self._entry(p, +1)
        if decode is not None:
            self._decoder(p, +1)

    def prefilled(self, request_id: str) -> None:
        """The prompt left `rank`'s prefill queue: aggregated, it decodes on there; split, its KV is
        on the way to the decode worker and the prefill worker is done with it."""
        p = self.placed[request_id]
        if p.decode is None:
            self.states[p.rank].inflight_prefill_tokens -= p.tokens
        else:
            self._entry(p, -1)
        p.tokens = 0

    def finished(self, request_id: str, src: int) -> Placed:
        """The result came from rank `src`; the request leaves the books."""
        p = self.placed.pop(request_id)
        if p.decode is None:
            self._entry(p, -1)
        else:
            self._decoder(p, -1)
            if src == p.rank:  # finished on the prefill side (its first token ended it)
                self._entry(p, -1)
        return p

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
