"""Chained 64-bit block hashes: the one definition that the router and every worker share.

    h[0] = xxh3_64(tokens[0:B], seed)
    h[i] = xxh3_64(h[i-1] || tokens[iB:(i+1)B], seed)

Only full blocks are hashed. Token ids are hashed as little-endian uint32, the parent as a
little-endian uint64. The seed mixes in everything that changes the KV (model id, cache salt);
two sides that disagree on the seed or on the block size never share a hit, so both come from
the job config and never from a default in here.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence

import xxhash

_PARENT = struct.Struct("<Q")


def num_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens (the last one may be partly filled): the one rounding
    rule of the tree, so the router's books, the cache and the handoff sizes never disagree."""
    return -(-num_tokens // block_size)


def hash_seed(model_id: str, block_size: int, salt: str = "") -> int:
    """The 64-bit seed for one model, block size and cache salt."""
    return xxhash.xxh3_64_intdigest(f"kvrelay/{model_id}/{block_size}/{salt}".encode())


def _token_bytes(tokens: Sequence[int]) -> bytes:
    buf = array("I", tokens)
    assert buf.itemsize == 4
    if sys.byteorder != "little":
        buf.byteswap()
    return buf.tobytes()


def hash_block(parent: int | None, tokens: Sequence[int], seed: int) -> int:
    """Hash of one full block given the hash of the block before it (None for the first)."""
    data = _token_bytes(tokens)
    if parent is not None:
        data = _PARENT.pack(parent) + data
    return xxhash.xxh3_64_intdigest(data, seed=seed)


def block_hashes(
    tokens: Sequence[int], block_size: int, seed: int, start: int = 0, parent: int | None = None
) -> list[int]:
    """Hashes of the full blocks of `tokens` from block index `start` on.

    `parent` is the hash of block `start - 1` (None when `start` is 0), so a caller that already
    holds the first hashes extends the chain without rehashing them.
    """
    out: list[int] = []
    for i in range(start, len(tokens) // block_size):
        parent = hash_block(parent, tokens[i * block_size : (i + 1) * block_size], seed)
        out.append(parent)
    return out
