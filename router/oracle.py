"""Oracle bounds for the prefix-hit ratio of a trace: what any placement could reach.

One LRU pool holding the blocks of all workers together, fed every request in arrival order,
with the engine's accounting: a request's leading cached blocks count as hit tokens, at most
`(input_length - 1) // block_size` blocks (the last token always runs), and then every full
block of its prompt becomes the most recently used. No placement over W separate caches of the
same total size beats it by much (only an LRU's blind spots), so `kv_aware`'s hit ratio over
the oracle's says how much cache a policy leaves unused. With `capacity_blocks=None` it is the
unbounded cache: the trace's own ceiling.

    python -m kvrelay.router.oracle TRACE.jsonl --block-size 64 --capacity-blocks 49152

`oracle_prompts` is the same pool for a batch file's token ids as one burst (bench/prefix.py, B6).
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kvrelay.core.block_hash import block_hashes
from kvrelay.router.trace import TRACE_BLOCK_TOKENS, TraceEntry, prompt_tokens, read_trace


@dataclass
class OracleResult:
    block_size: int
    capacity_blocks: int | None
    requests: int
    prompt_tokens: int
    hit_tokens: int
    hash_blocks: int  # the trace's 512-token blocks, all requests
    hash_block_hits: int  # of them, the leading ones seen before (unbounded cache)

    @property
    def hit_ratio(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_json(self) -> dict:
        return {**vars(self), "hit_ratio": self.hit_ratio,
                "hash_block_hit_ratio": self.hash_block_hits / self.hash_blocks if self.hash_blocks else 0.0}


def block_keys(entry: TraceEntry, block_size: int) -> Iterator[object]:
    """A key per full `block_size` block of the prompt, equal exactly when the engine's chained
    block hashes are: a block is fixed by the hash ids up to its own (chained) and its offset."""
    if TRACE_BLOCK_TOKENS % block_size:
        # Blocks straddle hash ids: hash the real tokens (slower, same answer).
        yield from block_hashes(prompt_tokens(entry, 2**31 - 1), block_size, 0)
        return
    per = TRACE_BLOCK_TOKENS // block_size
    full = entry.input_length // block_size
    chain = None
    for j, hid in enumerate(entry.hash_ids):
        chain = hash((chain, hid))
        for s in range(per):
            if j * per + s >= full:
                return
            yield (chain, s)


class _Pool:
    """The one LRU pool, counting hits as the engine does."""

    def __init__(self, res: OracleResult) -> None:
        self.res = res
        self.lru: OrderedDict[object, None] = OrderedDict()

    def feed(self, input_length: int, keys: list) -> None:
        res, lru = self.res, self.lru
        res.requests += 1
        res.prompt_tokens += input_length
        max_hit = (input_length - 1) // res.block_size
        hits = 0
        while hits < min(max_hit, len(keys)) and keys[hits] in lru:
            hits += 1
        res.hit_tokens += hits * res.block_size
        for k in keys:
            lru[k] = None
            lru.move_to_end(k)
        if res.capacity_blocks is not None:
            while len(lru) > res.capacity_blocks:
                lru.popitem(last=False)


def oracle(entries: Iterable[TraceEntry], block_size: int, capacity_blocks: int | None) -> OracleResult:
    res = OracleResult(block_size, capacity_blocks, 0, 0, 0, 0, 0)
    pool = _Pool(res)
    seen_ids: set[int] = set()
    for e in entries:
        pool.feed(e.input_length, list(block_keys(e, block_size)))
        # The trace's own unit: leading 512-token blocks seen before (chained ids).
        chain, lead = None, True
        for hid in e.hash_ids:
            chain = hash((chain, hid))
            lead = lead and chain in seen_ids
            res.hash_block_hits += lead
            seen_ids.add(chain)
        res.hash_blocks += len(e.hash_ids)
    return res


def oracle_prompts(prompts: Iterable[list[int]], block_size: int, capacity_blocks: int | None) -> OracleResult:
    """The same bound for a batch file's prompts (token ids) fed as one burst in file order:
    with an unbounded pool, each distinct prefix is computed once."""
    res = OracleResult(block_size, capacity_blocks, 0, 0, 0, 0, 0)
    pool = _Pool(res)
    for ids in prompts:
        pool.feed(len(ids), block_hashes(ids, block_size, 0))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--capacity-blocks", type=int, default=None, help="default: unbounded")
    p.add_argument("--limit", type=int, default=None, help="first N requests")
    args = p.parse_args(argv)
    res = oracle(read_trace(args.trace, args.limit), args.block_size, args.capacity_blocks)
    print(json.dumps(res.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
