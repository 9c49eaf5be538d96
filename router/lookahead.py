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
leave in an elevator sweep: the next line is the one with the smallest key at or after the last
one placed, wrapping at the end, so a line read late but sorting early waits at most one sweep
of the window, never for the file to end; equal keys leave in file order.
"""

from __future__ import annotations

import bisect
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
        self.order: list[tuple[tuple[int, ...], int]] = []  # sorted (key, read number)
        self.items: dict[int, tuple[T, int]] = {}  # read number -> (item, its prompt tokens)
        self.tokens = 0
        self.reads = 0
        self.cursor: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.items)

    def full(self) -> bool:
        return len(self.items) >= self.max_lines or self.tokens >= self.max_tokens

    def add(self, item: T, ids: Sequence[int]) -> None:
        self.reads += 1
        key = prefix_key(ids, self.block_size) if self.max_lines > 1 else ()
        bisect.insort(self.order, (key, self.reads))
        self.items[self.reads] = (item, len(ids))
        self.tokens += len(ids)

    def pop(self) -> T:
        assert self.order, "pop from an empty look-ahead"
        i = bisect.bisect_left(self.order, (self.cursor,))
        if i == len(self.order):
            i = 0
        self.cursor, n = self.order.pop(i)
        item, tokens = self.items.pop(n)
        self.tokens -= tokens
        return item
