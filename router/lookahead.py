"""Look-ahead: input lines read and tokenized ahead of placement, handed to placement in prefix order.

In a batch file every line is known up front, and lines that share a prefix (questions about one
document, turns of one conversation) may sit far apart. The frontend reads up to
`router.lookahead_lines` lines (and at most `router.lookahead_tokens` prompt tokens) ahead and
places them in the order of a sweep over their prefixes, so lines that share one are placed one
after the other and the router's books (router/books.py) send them to the worker that computes it.
Output order is by custom_id and resume by custom_id (router/batch_output.py), so the order in
which lines run changes no output line.

NOTE (order): a line's key is the tuple of hashes of its first 1, 2, 4, 8, ... blocks of tokens,
so sorting keys clusters lines by their longest shared prefix at block granularity, as a walk
of a prefix tree would (SGLang's longest-prefix-match scheduling orders its waiting queue the same
way), and a line whose prompt is a prefix of another's (an earlier turn) sorts first. Keys cost a
few xxh3 calls per line, and compare in a few words, not in a prompt's worth of tokens. Lines
leave in sweeps (FSCAN, as disk schedulers avoid starvation): a sweep takes every line read so
far, sorted, and lines read during it wait for the next one, so no line waits longer than two
windows of lines, however many lines with a smaller key keep arriving; equal keys keep file order.
A group of lines that straddles two sweeps is placed in two runs; the router's books and the
windows still send the second run to the worker that holds the prefix.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Generic, TypeVar

import xxhash

T = TypeVar("T")


def prefix_key(ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Hashes of the first block_size * 2**k tokens, for every such prefix the prompt holds."""
    data = memoryview(array("I", ids).tobytes())
    key = []
    n = block_size
    while n <= len(ids):
        key.append(xxhash.xxh3_64_intdigest(data[: 4 * n]))
        n *= 2
    return tuple(key)


class LookAhead(Generic[T]):
    def __init__(self, max_lines: int, max_tokens: int, block_size: int) -> None:
        assert max_lines >= 1 and max_tokens >= 1 and block_size >= 1
        self.max_lines = max_lines
        self.max_tokens = max_tokens
        self.block_size = block_size
        self.incoming: list[tuple[tuple[int, ...], int, T, int]] = []  # (key, read number, item, tokens)
        self.sweep: list[tuple[tuple[int, ...], int, T, int]] = []  # the current sweep, largest key first
        self.tokens = 0
        self.reads = 0

    def __len__(self) -> int:
        return len(self.incoming) + len(self.sweep)

    def full(self) -> bool:
        return len(self) >= self.max_lines or self.tokens >= self.max_tokens

    def add(self, item: T, ids: Sequence[int]) -> None:
        self.reads += 1
        key = prefix_key(ids, self.block_size) if self.max_lines > 1 else ()
        self.incoming.append((key, self.reads, item, len(ids)))
        self.tokens += len(ids)

    def pop(self) -> T:
        if not self.sweep:
            assert self.incoming, "pop from an empty look-ahead"
            self.sweep = sorted(self.incoming, key=lambda x: x[:2], reverse=True)
            self.incoming = []
        _, _, item, tokens = self.sweep.pop()
        self.tokens -= tokens
        return item
