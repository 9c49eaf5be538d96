"""The graph-capturable torch decode attention (the GPU fallback when the Triton kernels are absent)
against the reference paged attention, on random caches in shuffled blocks, with padding rows."""

from __future__ import annotations

import pytest
import torch

from kvrelay.kernels.attention import paged_attention
from kvrelay.ranks.engine.attention_backend import decode_attention_torch

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
