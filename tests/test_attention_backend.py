"""The GPU attention paths used when the Triton kernels are absent (the graph-capturable torch
decode, the mixed-step split) against the reference paged attention, on random caches in shuffled
blocks, with padding rows."""

from __future__ import annotations

import pytest
import torch

from kvrelay.kernels.attention import paged_attention
from kvrelay.ranks.engine.attention_backend import decode_attention_torch, mixed_attention_torch
from kvrelay.ranks.engine.attention_backend import AttentionMetadata

BLOCK_SIZE, HEAD_DIM = 4, 16


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_torch_matches_reference(heads, kv_heads, window):
    gen = torch.Generator().manual_seed(heads + kv_heads + (window or 0))
    seq_lens = [1, 7, 13, 4, 0]  # the last row is padding
    num_blocks, width = 32, 5
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM, generator=gen)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM, generator=gen)
    # Every entry a valid block id, unused ones included (they must not be read).
    tables = torch.randperm(num_blocks, generator=gen)[: len(seq_lens) * width].view(len(seq_lens), width).int()
    q = torch.randn(len(seq_lens), heads, HEAD_DIM, generator=gen)
    scale = HEAD_DIM**-0.5
    got = decode_attention_torch(q, k_cache, v_cache, torch.tensor(seq_lens, dtype=torch.int32), tables, scale, window)
    live = seq_lens[:-1]
    want = paged_attention(q[:-1], k_cache, v_cache, list(range(len(live) + 1)), live, tables[:-1], scale, window)
    torch.testing.assert_close(got[:-1], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[-1], torch.zeros_like(got[-1])), "a padding row gives zeros, not NaN"


@pytest.mark.parametrize("window", [None, 5])
def test_mixed_torch_matches_reference(window):
    gen = torch.Generator().manual_seed(11 + (window or 0))
    heads, kv_heads = 8, 2
    seq_lens, q_lens = [9, 1, 14, 6, 3], [1, 1, 5, 1, 3]  # decode rows and prompt chunks mixed
    k_cache = torch.randn(32, BLOCK_SIZE, kv_heads, HEAD_DIM, generator=gen)
    v_cache = torch.randn(32, BLOCK_SIZE, kv_heads, HEAD_DIM, generator=gen)
    tables = torch.randperm(32, generator=gen)[:20].view(5, 4).int()
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], heads, HEAD_DIM, generator=gen)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.int64), qsl, seq_lens, tables,
                             seq_lens_dev=torch.tensor(seq_lens, dtype=torch.int32), max_query_len=5)
    got = mixed_attention_torch(q, k_cache, v_cache, meta, 0.25, window)
    want = paged_attention(q, k_cache, v_cache, qsl, seq_lens, tables, 0.25, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
