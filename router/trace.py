"""Trace replay: requests from a timed trace in the Mooncake format, with real, shared tokens.

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, ...]}

`timestamp` is the arrival in milliseconds from the start; `hash_ids` name the prompt's 512-token
blocks (the last one may be partial: the prompt is the first `input_length` tokens). Each id
becomes 512 deterministic pseudo-random token ids (`block_tokens`), so two requests that share an
id share those tokens, and with them the KV that a prefix cache can reuse; a request generates
exactly `output_length` tokens (EOS ignored).

    for entry in read_trace("trace.jsonl", vocab_size=128256): ...
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvrelay.core.block_hash import num_blocks

TRACE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake trace format
_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")


class TraceError(ValueError):
    """A trace line that is not in the format; the message names the line and the fix."""


@dataclass
class TraceEntry:
    line_no: int  # 1-based
    arrival_s: float  # seconds from the trace's start
    hash_ids: list[int]
    input_length: int
    output_length: int


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on uint64 (wrapping arithmetic): a fast, platform-independent mix."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def block_tokens(hash_ids: list[int], vocab_size: int) -> np.ndarray:
    """[len(hash_ids) * 512] int64 token ids in [1, vocab_size): a function of each id alone."""
    assert vocab_size > 1
    ids = np.asarray(hash_ids, dtype=np.uint64)[:, None] * np.uint64(TRACE_BLOCK_TOKENS)
    pos = ids + np.arange(TRACE_BLOCK_TOKENS, dtype=np.uint64)[None, :]
    return (_splitmix64(pos.ravel()) % np.uint64(vocab_size - 1)).astype(np.int64) + 1


def prompt_tokens(entry: TraceEntry, vocab_size: int) -> list[int]:
    return block_tokens(entry.hash_ids, vocab_size)[: entry.input_length].tolist()


def parse_entry(raw: bytes | str, line_no: int) -> TraceEntry:
    def bad(why: str) -> TraceError:
        return TraceError(f"trace line {line_no}: {why}; each line must be "
                          '{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [ids of 512-token blocks]}')

    try:
        d = json.loads(raw)
    except ValueError as e:
        raise bad(f"not JSON ({e})") from None
    if not isinstance(d, dict):
        raise bad(f"a JSON {type(d).__name__}, not an object")
    missing = [k for k in _KEYS if k not in d]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    ts, n_in, n_out, ids = (d[k] for k in _KEYS)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts < 0:
        raise bad(f"timestamp must be a number of milliseconds >= 0, got {ts!r}")
    for key, v in (("input_length", n_in), ("output_length", n_out)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(f"{key} must be an integer >= 1, got {v!r}")
    if not isinstance(ids, list) or not ids or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h < 1 << 63 for h in ids):
        raise bad("hash_ids must be a non-empty list of integers in [0, 2**63)")
    if n_in > len(ids) * TRACE_BLOCK_TOKENS:
        raise bad(f"input_length {n_in} needs {num_blocks(n_in, TRACE_BLOCK_TOKENS)} hash_ids of "
                  f"{TRACE_BLOCK_TOKENS} tokens, the line has {len(ids)}")
    return TraceEntry(line_no, ts / 1000.0, ids, n_in, n_out)


def read_trace(path: str | Path, limit: int | None = None) -> Iterator[TraceEntry]:
    """Streams entries in file order; arrivals must not go back in time."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"trace file {str(p)!r} does not exist")
    last = 0.0
    count = 0
    with p.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if limit is not None and count >= limit:
                return
            entry = parse_entry(raw, line_no)
            if entry.arrival_s < last:
                raise TraceError(f"trace line {line_no}: timestamp {entry.arrival_s * 1000:g} ms is before the "
                                 f"previous line's {last * 1000:g} ms; sort the trace by timestamp")
            last = entry.arrival_s
            count += 1
            yield entry
