"""The torch reference paged attention against dense attention written out by hand.

Keys and values are scattered over shuffled, non-contiguous cache blocks with `write_kv`; the
reference computes softmax(q k^T * scale + mask) v in float64 on the unpaged tensors.
"""

from __future__ import annotations

import pytest
import torch

from kvrelay.kernels.attention import paged_attention, write_kv

HEAD_DIM = 16
BLOCK_SIZE = 4


def _dense(q, k, v, seq_len, scale, window):
    """q [q_len, heads, D] holds the last q_len positions; k, v [seq_len, kv_heads, D] -> [q_len, heads, D] f64."""
    q_len, heads, _ = q.shape
    group = heads // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # [seq_len, heads, D]
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale  # [heads, q_len, seq_len]
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    allowed = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _paged_case(seq_lens, q_lens, heads, kv_heads, dtype, gen):
    """Random k/v for every context token written into shuffled blocks, and q for the last q_len of each."""
    need = [(n + BLOCK_SIZE - 1) // BLOCK_SIZE for n in seq_lens]
    num_blocks = sum(need) + 3  # spare blocks that no sequence owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(seq_lens), max(need) + 2), -1, dtype=torch.int32)  # padded past use
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    ks, vs, qs = [], [], []
    for i, (n, q_len) in enumerate(zip(seq_lens, q_lens)):
        blocks = [order.pop() for _ in range(need[i])]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(n, kv_heads, HEAD_DIM, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, HEAD_DIM, generator=gen).to(dtype)
        slots = torch.tensor([blocks[t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE for t in range(n)])
        write_kv(k, v, k_cache, v_cache, slots)
        ks.append(k)
        vs.append(v)
        qs.append(torch.randn(q_len, heads, HEAD_DIM, generator=gen).to(dtype))
    query_start_loc = [0]
    for q_len in q_lens:
        query_start_loc.append(query_start_loc[-1] + q_len)
    return torch.cat(qs), ks, vs, k_cache, v_cache, query_start_loc, tables


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_matches_dense(heads, kv_heads, window):
    gen = torch.Generator().manual_seed(heads * 7 + (window or 0))
    # A whole prompt, a chunk in the middle of a sequence, decode tokens, a block-aligned length, one token.
    seq_lens = [13, 23, 9, 16, 1, 30]
    q_lens = [13, 6, 1, 16, 1, 1]
    scale = HEAD_DIM**-0.5
    q, ks, vs, k_cache, v_cache, qsl, tables = _paged_case(seq_lens, q_lens, heads, kv_heads, torch.float32, gen)
    out = paged_attention(q, k_cache, v_cache, qsl, seq_lens, tables, scale, window)
    assert out.shape == q.shape and out.dtype == torch.float32
    for i, n in enumerate(seq_lens):
        ref = _dense(q[qsl[i] : qsl[i + 1]], ks[i], vs[i], n, scale, window)
        torch.testing.assert_close(out[qsl[i] : qsl[i + 1]].double(), ref, atol=2e-6, rtol=1e-5)


def test_padding_rows_and_slots():
    """Negative slots leave the cache alone; rows past the last sequence come back zero."""
    gen = torch.Generator().manual_seed(1)
    q, ks, vs, k_cache, v_cache, qsl, tables = _paged_case([10], [3], 4, 2, torch.float32, gen)
    before = k_cache.clone(), v_cache.clone()
    pad = torch.randn(2, 2, HEAD_DIM, generator=gen)
    write_kv(pad, pad, k_cache, v_cache, torch.tensor([-1, -1]))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    q_padded = torch.cat([q, torch.randn(2, 4, HEAD_DIM, generator=gen)])
    out = paged_attention(q_padded, k_cache, v_cache, qsl, [10], tables, 0.25)
    assert torch.equal(out[3:], torch.zeros(2, 4, HEAD_DIM))
    torch.testing.assert_close(out[:3].double(), _dense(q, ks[0], vs[0], 10, 0.25, None), atol=2e-6, rtol=1e-5)


def test_bf16_cache_computes_in_float32():
    """A bf16 cache gives the float32 attention of the bf16 values, rounded once to bf16."""
    gen = torch.Generator().manual_seed(2)
    seq_lens, q_lens = [19, 7], [5, 1]
    q, ks, vs, k_cache, v_cache, qsl, tables = _paged_case(seq_lens, q_lens, 8, 2, torch.bfloat16, gen)
    out = paged_attention(q, k_cache, v_cache, qsl, seq_lens, tables, HEAD_DIM**-0.5, None)
    assert out.dtype == torch.bfloat16
    for i, n in enumerate(seq_lens):
        ref = _dense(q[qsl[i] : qsl[i + 1]], ks[i], vs[i], n, HEAD_DIM**-0.5, None).to(torch.bfloat16)
        torch.testing.assert_close(out[qsl[i] : qsl[i + 1]], ref)  # bf16 defaults: within about one ulp
